"""lens_core.enhance: GPT-OSS text generation on the text encoder against transformers' GptOssForCausalLM,
the official reasoner's template and clean-up, weight sources and bad input."""
import json

import pytest
import torch

import fixtures
from lens_core import checkpoints as ck
from lens_core import enhance as E
from lens_core import prompt as P
from lens_core import text_encoder as T
from lens_core.memory import module_bytes
from lens_core.generator import TextGenerator

PROMPT_LEN = 20     # longer than the sliding window (5) of the tiny models
NEW_TOKENS = 56     # >= 48 greedy tokens compared


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny per-token ops: one thread avoids OpenMP spin-waiting on a shared 2-core machine (10-30x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module", params=[dict(seed=0, head_dim=32, window=5, layers=4),
                                        dict(seed=1, head_dim=16, window=6, layers=3, experts=8, top_k=3)],
                ids=["seed0", "seed1"])
def lm(request, tmp_path_factory):
    """(folder, transformers reference model, our encoder) for a tiny random GPT-OSS written in the real
    MXFP4 layout. transformers reads the same files (its MXFP4 loader dequantizes them on CPU)."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    kw = dict(request.param)
    folder = fixtures.write_gptoss_lm(tmp_path_factory.mktemp("gptoss_lm") / "text_encoder", **kw)
    hf = GptOssForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                           quantization_config=Mxfp4Config(dequantize=True)).eval()
    assert hf.config._attn_implementation == "eager" and hf.config.sliding_window < PROMPT_LEN
    ours = ck.load_text_encoder(folder, dtype=torch.float32, selected_layers=(1,))
    assert len(ours.model.layers) == 2 and not E.generator_for(ours).ready
    keys = {k: v.shape for k, v in ours.state_dict().items()}
    gen = E.load_generation_weights(ours)
    assert gen is E.generator_for(ours) and gen.ready and len(gen.decoder_layers()) == kw["layers"]
    # the encoder itself did not grow: same modules, same state dict
    assert len(ours.model.layers) == 2 and {k: v.shape for k, v in ours.state_dict().items()} == keys
    return folder, hf, ours


def _prompt(seed, n=PROMPT_LEN, vocab=300):
    return torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(100 + seed))


def test_greedy_matches_transformers(lm):
    folder, hf, ours = lm
    ids = _prompt(0)
    new, logits = E.generate(ours, ids, NEW_TOKENS, eos_token_ids=(), output_logits=True)
    # an eos id that our run never produced: neither side stops early
    eos = next(i for i in range(2, 300) if i not in new[0].tolist())
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=[eos], pad_token_id=0)
    assert new.shape == (1, NEW_TOKENS) and ref.sequences.shape == (1, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(new, ref.sequences[:, PROMPT_LEN:])
    errs = [rel_err(a, b) for a, b in zip(logits, ref.logits)]
    assert len(errs) == NEW_TOKENS and max(errs) <= 1e-5, max(errs)
    # positions past the YaRN original context are exercised by the RoPE test below; here the cache crossed the
    # sliding window many times over (20 + 56 positions vs a window of 5-6)


def test_greedy_matches_transformers_on_packed_matvec_path(lm, monkeypatch, matvec_kernel):
    """The same comparison with every decode step's packed experts on the one-token packed matvec
    (``quant.mxfp4_matvec``, used on the CPU for banks above a size threshold; forced here for the tiny model),
    with each of its kernels: compiled, and product table."""
    from lens_core import quant

    folder, hf, ours = lm
    monkeypatch.setattr(quant, "_MATVEC_MIN_BYTES", 0)
    calls = []
    real = quant.mxfp4_matvec
    monkeypatch.setattr(quant, "mxfp4_matvec", lambda *a: calls.append(1) or real(*a))
    ids = _prompt(5)
    new, logits = E.generate(ours, ids, 48, eos_token_ids=(), output_logits=True)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=48, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=48)
    assert len(calls) == 47 * 2 * len(E.generator_for(ours).decoder_layers())   # every decode step, both projections
    assert len(matvec_kernel.checked) == (2 if matvec_kernel.enabled else 0)   # compiled: gate_up and down
    assert torch.equal(new, ref.sequences[:, PROMPT_LEN:])
    assert max(rel_err(a, b) for a, b in zip(logits, ref.logits)) <= 1e-5


def test_expert_cache_greedy_matches_transformers(lm):
    """The optional decode-time expert cache (dequantized experts, LRU within a byte budget): a budget too small
    for all experts (evictions) and one that holds them all give transformers' greedy ids and logits; removed
    afterwards."""
    folder, hf, ours = lm
    ids = _prompt(7)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=48, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=48)
    layers = E.generator_for(ours).decoder_layers()
    bank = layers[0].mlp.experts
    every = 3 * bank.intermediate_size * bank.hidden_size * 4 * bank.num_experts * len(layers)  # fp32
    try:
        for budget in (every // 2, 10 ** 9):
            cache = ours.set_expert_cache(budget)
            new, logits = E.generate(ours, ids, 48, eos_token_ids=(), output_logits=True)
            assert torch.equal(new, ref.sequences[:, PROMPT_LEN:])
            assert max(rel_err(a, b) for a, b in zip(logits, ref.logits)) <= 1e-5
            assert cache.hits > 0 and cache.misses > 0 and cache.nbytes <= budget
            assert all(layer.mlp.experts.expert_cache is cache for layer in layers)   # the generator's too
    finally:
        ours.set_expert_cache(None)
    E.generate(ours, ids, 1, eos_token_ids=())
    assert all(layer.mlp.experts.expert_cache is None for layer in layers)
    with pytest.raises(ValueError, match="max_bytes"):
        ours.set_expert_cache(-5)


def test_eos_stop_matches_transformers(lm):
    _, hf, ours = lm
    ids = _prompt(0)
    full = E.generate(ours, ids, 30, eos_token_ids=())
    eos = int(full[0, 12])                       # a token greedy decoding produces at step 13 (or earlier)
    first = full[0].tolist().index(eos)
    new = E.generate(ours, ids, 30, eos_token_ids=(eos, 299))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=[eos, 299], pad_token_id=0)
    assert new.shape[1] == first + 1 and int(new[0, -1]) == eos
    assert torch.equal(new, ref[:, PROMPT_LEN:])


def test_kv_cache_equals_recomputation(lm):
    """Each cached decode step's logits equal a fresh prefill of the whole sequence so far (no cache reuse)."""
    _, _, ours = lm
    gen = E.generator_for(ours)
    ids = _prompt(1)
    new, logits = E.generate(ours, ids, 24, eos_token_ids=(), output_logits=True)
    seq = torch.cat([ids, new], dim=1)
    for step in (0, 1, 5, 13, 23):
        cache = gen.new_kv_cache(1, PROMPT_LEN + step)
        with torch.no_grad():
            fresh = gen.logits_step(seq[:, :PROMPT_LEN + step], cache)
        assert rel_err(logits[step], fresh) <= 1e-5, step
        assert int(fresh.argmax()) == int(new[0, step])


def test_attention_paths_and_query_blocks_agree(lm, monkeypatch):
    """Generation attention runs fp32 through SDPA (the sink as one more key column with a zero value) and
    other dtypes through the eager softmax, both in blocks of ``_QUERY_CHUNK`` prompt rows: 3-row blocks, and the
    eager path in float64, give the default's greedy ids and logits."""
    import copy

    _, _, ours = lm
    ids = _prompt(8)
    ref_new, ref_logits = E.generate(ours, ids, 8, eos_token_ids=(), output_logits=True)
    enc64 = copy.deepcopy(ours).double()
    enc64.compute_dtype = torch.float64
    eager64 = TextGenerator(enc64)
    eager64.load_state_dict({k: v.double() if v.is_floating_point() else v
                             for k, v in E.generator_for(ours).state_dict().items()}, assign=True)
    for chunk in (T._QUERY_CHUNK, 3):
        monkeypatch.setattr(T, "_QUERY_CHUNK", chunk)
        for model in (ours, eager64):
            new, logits = E.generate(model, ids, 8, eos_token_ids=(), output_logits=True)
            assert torch.equal(new, ref_new)
            assert max(rel_err(a, b) for a, b in zip(logits, ref_logits)) <= 1e-6, (chunk, model is ours)


def test_prefix_kept_and_reused_exactly(lm, monkeypatch):
    """``prefix_len``: the prefix is prefilled on its own and kept by the generator; a later prompt with the same
    prefix copies its keys/values (only the rest is prefilled) and gives bit-identical ids and logits to a run
    that computed it; a different prefix replaces it. Against the one-pass prefill: same greedy ids, logits to
    fp32 rounding. The kept prefix is keyed by the explicit weights versions of the encoder and the generator:
    a bump (what loaders and in-place editors do) or a load_state_dict makes it be computed again."""
    _, _, ours = lm
    gen = E.generator_for(ours)
    gen.clear_prefix_cache()
    seen = []
    real = gen.logits_step
    monkeypatch.setattr(gen, "logits_step", lambda ids, cache: seen.append(ids.shape[1]) or real(ids, cache))
    a, b = _prompt(11), _prompt(11).clone()
    b[0, 9:] = _prompt(12)[0, 9:]                                 # same first 9 tokens, another rest
    one_pass, one_logits = E.generate(ours, a, 10, eos_token_ids=(), output_logits=True)
    assert seen == [PROMPT_LEN]
    seen.clear()
    first, first_logits = E.generate(ours, a, 10, eos_token_ids=(), output_logits=True, prefix_len=9)
    assert seen == [9, PROMPT_LEN - 9]                            # the prefix computed, then the rest
    assert torch.equal(first, one_pass) and max(rel_err(x, y) for x, y in zip(first_logits, one_logits)) <= 1e-5
    seen.clear()
    again, again_logits = E.generate(ours, a, 10, eos_token_ids=(), output_logits=True, prefix_len=9)
    assert seen == [PROMPT_LEN - 9]                               # the prefix copied
    assert torch.equal(again, first) and all(torch.equal(x, y) for x, y in zip(again_logits, first_logits))
    for change in (lambda: T.bump_weights_version(ours),          # an in-place edit of the encoder, announced
                   lambda: ours.load_state_dict(ours.state_dict()),
                   lambda: T.bump_weights_version(gen),
                   lambda: gen.load_state_dict(gen.state_dict())):
        change()
        seen.clear()
        assert torch.equal(E.generate(ours, a, 2, eos_token_ids=(), prefix_len=9), first[:, :2])
        assert seen == [9, PROMPT_LEN - 9]                        # computed again (same numbers)
    other = E.generate(ours, b, 10, eos_token_ids=(), prefix_len=9)
    E.clear_prefix_cache(ours)
    assert gen.prefix_cache is None
    seen.clear()
    assert torch.equal(E.generate(ours, b, 10, eos_token_ids=(), prefix_len=9), other) and seen == [9, PROMPT_LEN - 9]
    seen.clear()
    E.generate(ours, _prompt(13), 2, eos_token_ids=(), prefix_len=9)  # another prefix: recomputed, replaces it
    assert seen == [9, PROMPT_LEN - 9]
    key = gen.prefix_cache
    assert key[0] == tuple(_prompt(13)[0, :9].tolist()) and key[3:] == (T.weights_version(ours), gen.weights_version)
    assert gen._prefix[1][0].shape[2] == 9 and gen._prefix[1][0].device.type == "cpu"
    for bad in (PROMPT_LEN, -1):
        with pytest.raises(ValueError, match="prefix_len"):
            E.generate(ours, a, 2, eos_token_ids=(), prefix_len=bad)
    with pytest.raises(ValueError, match="one row"):
        E.generate(ours, torch.cat([a, a]), 2, eos_token_ids=(), prefix_len=3)
    E.clear_prefix_cache(ours)


def test_generator_is_its_own_module(lm, tmp_path):
    """The generator references the encoder's layers (same objects), owns the rest (its own state dict, in the
    checkpoint's key names), owns its KV cache only while it generates, and never changes the encoder; one
    generator per live encoder, which does not keep the encoder alive."""
    import gc
    import weakref

    folder, _, ours = lm
    gen = E.generator_for(ours)
    layers = gen.decoder_layers()
    assert all(a is b for a, b in zip(layers, ours.model.layers)) and len(layers) == ours.config.num_hidden_layers
    own = set(gen.state_dict())
    assert "model.norm.weight" in own and "lm_head.weight" in own
    assert not any(k.startswith("model.layers.1.") for k in own) and any(k.startswith("model.layers.2.") for k in own)
    assert not (own & set(ours.state_dict()))
    seen = []
    E.generate(ours, _prompt(3), 3, eos_token_ids=(), callback=lambda d, t: seen.append(gen.kv_cache is not None))
    assert seen == [True] * 3 and gen.kv_cache is None
    # interrupted: the cache is dropped too, nothing else changes
    with pytest.raises(KeyboardInterrupt):
        E.generate(ours, _prompt(3), 3, eos_token_ids=(), callback=lambda d, t: (_ for _ in ()).throw(KeyboardInterrupt))
    assert gen.kv_cache is None
    # one kept generator per encoder; it does not keep a dropped encoder alive
    enc = ck.load_text_encoder(folder, dtype=torch.float32, selected_layers=(1,))
    g2 = E.load_generation_weights(enc)
    assert g2 is not gen and E.generator_for(enc) is g2 and E.generator_for(g2) is g2
    ref = weakref.ref(enc)
    del enc
    gc.collect()
    assert ref() is None
    with pytest.raises(ValueError, match="no longer exists"):
        g2.encoder
    with pytest.raises(ValueError, match="LensTextEncoder or a TextGenerator"):
        E.generator_for(object())


def test_batch_rows_equal_single_runs(lm):
    _, _, ours = lm
    a, b = _prompt(2), _prompt(3)
    both = E.generate(ours, torch.cat([a, b]), 12, eos_token_ids=())
    assert torch.equal(both[0], E.generate(ours, a, 12, eos_token_ids=())[0])
    assert torch.equal(both[1], E.generate(ours, b, 12, eos_token_ids=())[0])


def test_sampling_with_seed(lm):
    _, _, ours = lm
    ids = _prompt(4)
    a = E.generate(ours, ids, 20, temperature=0.7, seed=5, eos_token_ids=())
    b = E.generate(ours, ids, 20, temperature=0.7, seed=5, eos_token_ids=())
    c = E.generate(ours, ids, 20, temperature=0.7, seed=6, eos_token_ids=())
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top_k = 1 sampling is greedy decoding whatever the seed
    g = E.generate(ours, ids, 20, eos_token_ids=())
    assert torch.equal(E.generate(ours, ids, 20, temperature=0.7, seed=9, top_k=1, eos_token_ids=()), g)


def test_sampling_distribution_is_temperature_top_k():
    """One sampling step draws from softmax(top-k(logits) / T): the empirical frequencies of many draws."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(4000):
        counts[int(E._pick(logits, 0.7, 3, g))] += 1
    expect = torch.zeros(6)
    top = torch.tensor([5, 0, 1])
    expect[top] = torch.softmax(logits[0, top] / 0.7, dim=0)
    assert counts[[2, 3, 4]].sum() == 0
    assert torch.allclose(counts / 4000, expect, atol=0.03)


def test_later_layers_loaded_on_demand_equal_full_load(lm):
    folder, _, ours = lm
    full = ck.load_text_encoder(folder, dtype=torch.float32, selected_layers=(ours.config.num_hidden_layers - 1,))
    embed = ours.model.embed_tokens.weight
    g_full = E.load_generation_weights(full)
    assert full.model.embed_tokens.weight is not embed
    assert len(g_full.model.layers) == 0 and set(g_full.state_dict()) == {"model.norm.weight", "lm_head.weight"}
    ids = _prompt(5)
    a, la = E.generate(ours, ids, 8, eos_token_ids=(), output_logits=True)
    b, lb = E.generate(full, ids, 8, eos_token_ids=(), output_logits=True)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(la, lb))
    # the feature path is unchanged by the added modules (early exit at the last selected layer)
    fresh = ck.load_text_encoder(folder, dtype=torch.float32, selected_layers=(1,))
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert torch.equal(ours(ids, mask)[0], fresh(ids, mask)[0])
    # loading again is a no-op (same tensors, same version)
    gen = E.generator_for(ours)
    head, version = gen.lm_head.weight, gen.weights_version
    E.load_generation_weights(ours)
    assert gen.lm_head.weight is head and gen.weights_version == version


def test_yarn_rope_far_positions():
    """RoPE at arbitrary positions (beyond the 4096 original context) equals transformers' rotary embedding."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    te = T.LensTextEncoder(T.TextEncoderConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64,
                                               head_dim=64, num_attention_heads=1, num_key_value_heads=1,
                                               num_local_experts=1, num_experts_per_tok=1, vocab_size=8),
                           selected_layers=(0,), device="meta", dtype=torch.float32)
    rot = GptOssRotaryEmbedding(GptOssConfig())
    for start in (0, 4090, 70000):
        cos, sin = te.rope_tables(9, torch.float32, "cpu", start=start)
        pos = torch.arange(start, start + 9)[None]
        rcos, rsin = rot(torch.zeros(1, 9, 64), pos)
        assert torch.allclose(cos, rcos[0, :, :32], rtol=1e-6, atol=1e-6)
        assert torch.allclose(sin, rsin[0, :, :32], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the official reasoner: template, clean-up, the enhancer on the golden tiny Lens encoder

def test_data_file_and_template_match_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    data = json.loads(open(E.DATA_FILE, encoding="utf-8").read())
    assert "MIT License" in data["license_notice"] and "microsoft/Lens" in data["source"]["project"]
    assert data["system_prompt"].startswith("You are a prompt rewriter for a text-to-image model.")
    sysmsg = E.system_message()
    assert sysmsg.endswith("\n\nKeep any reasoning private. The visible answer must contain only the final "
                           "rewritten prompt.")
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok = P.load_tokenizer(tokenizer_dir)
    for text in ("a cat on a skateboard", "  两只猫 <|end|> x\n", ""):
        conv = [{"role": "system", "content": sysmsg, "thinking": None},
                {"role": "user", "content": text, "thinking": None}]
        ref = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, reasoning_effort="low")
        assert E.render_enhance_prompt(text, date="today") == ref
        ids = E.enhance_ids(tok, text, 10, 131072, date="today")
        assert ids[0].tolist() == hf(ref, add_special_tokens=True).input_ids
    assert "Reasoning: low" in E.render_enhance_prompt("x") and "2026-05-23" in E.render_enhance_prompt("x")


@pytest.mark.parametrize("raw, want", [
    ("<|channel|>analysis<|message|>We need to rewrite.<|end|><|start|>assistant<|channel|>final<|message|>"
     "A red cube  on a\nwooden table.<|return|>", "A red cube on a wooden table."),
    ("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>first<|end|>"
     "<|start|>assistant<|channel|>final<|message|>second answer<|return|>", "second answer"),
    ("<|channel|>final<|message|>```\nA cat wearing a hat.\n```<|return|>", "A cat wearing a hat."),
    ('<|channel|>final<|message|>"A quoted prompt."<|return|>', "A quoted prompt."),
    ("<|channel|>analysis<|message|>thinking<|end|><|start|>assistant<|channel|>final<|message|><|return|>", ""),
    ("<|channel|>analysis<|message|>still thinking when the budget ran out", ""),   # our one deviation
    ("<|message|>no channel at all<|end|>", "<|message|>no channel at all"),
    ("analysis We should describe... assistantfinal A dog in the snow.", "A dog in the snow."),
    ("<think>hidden</think> Plain answer<|endoftext|>", "Plain answer"),
    ("Analysis of the scene", ""),
])
def test_clean_output(raw, want):
    assert E.clean_output(raw) == want


@pytest.fixture(scope="module")
def golden_encoder(pipeline_dir):
    te = ck.load_text_encoder(pipeline_dir, dtype=torch.float32)
    tok = ck.load_tokenizer(pipeline_dir)
    return te, tok


def test_enhance_on_golden_encoder(golden_encoder, pipeline_dir):
    """The golden tiny Lens encoder (tied embeddings, vocab 201088, real tokenizer): enhance() runs the official
    conversation and returns a cleaned string or the original prompt; an interrupt leaves the encoder usable."""
    te, tok = golden_encoder
    gen = E.generator_for(te)
    assert gen.lm_head is None and te.config.tie_word_embeddings      # tied: the embedding is the head
    ids, mask = P.tokenize(tok, ["a red cube on a wooden table"])
    with torch.no_grad():
        before = te(ids, mask)
    # empty prompt: unchanged, nothing loaded
    assert E.enhance(te, tok, "") == "" and E.enhance(te, tok, "  \n") == "  \n"
    assert not gen.ready
    assert E.default_eos_ids(te) == (200002, 199999, 200012)   # the golden generation_config.json
    seen = []

    def stop_at_3(done, total):
        seen.append((done, total))
        if done == 3:
            raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        E.enhance(te, tok, "a red cube", seed=1, max_new_tokens=12, callback=stop_at_3)
    assert seen == [(1, 12), (2, 12), (3, 12)] and gen.ready and gen.kv_cache is None
    a = E.enhance(te, tok, "a red cube", seed=1, max_new_tokens=12)
    b = E.enhance(te, tok, "a red cube", seed=1, max_new_tokens=12)
    assert isinstance(a, str) and a == b
    # enhance() prefills the template head (system prompt) on its own and keeps it for the next rewrite
    eids, head = E._enhance_ids(tok, "a red cube", 12, 131072, None)
    assert torch.equal(eids, E.enhance_ids(tok, "a red cube", 12, 131072))
    assert gen.prefix_cache[0] == tuple(eids[0, :head].tolist())
    raw = E.generate(te, eids, 12, 0.7, 1, pad_token_id=tok.pad_id, prefix_len=head)
    assert a == (E.clean_output(tok.tokenizer.decode(raw[0].tolist(), skip_special_tokens=False)) or "a red cube")
    E.clear_prefix_cache(te)
    assert E.enhance(te, tok, "a red cube", seed=1, max_new_tokens=12) == a      # computed again: the same
    with torch.no_grad():
        after = te(ids, mask)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_long_prompt_truncated_with_warning(golden_encoder):
    te, tok = golden_encoder
    head, tail = (len(x) for x in tok.encode(list(E.render_parts())))
    text = " ".join(["word"] * 300)
    n = len(tok.encode([text])[0])
    with pytest.warns(UserWarning, match=r"truncated to 50 tokens, .*\(%d tokens dropped" % (n - 50)):
        ids = E.enhance_ids(tok, text, 10, head + tail + 50 + 10)
    assert ids.shape == (1, head + tail + 50)
    with pytest.warns(UserWarning, match="truncated"):
        out = E.enhance(te, tok, text, seed=0, max_new_tokens=4, context=head + tail + 60)
    assert isinstance(out, str)
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        E.enhance_ids(tok, "x", 100, head + tail + 50)


@pytest.mark.parametrize("float_type,fused", [("F32", False), ("Q8_0", True)])
def test_gguf_output_weight_is_the_lm_head(lm, tmp_path, float_type, fused):
    """A GPT-OSS GGUF (llama.cpp names: ``output.weight`` = lm_head, ``output_norm.weight`` = final norm, later
    layers' MXFP4 banks) generates exactly like the diffusers folder it was written from when every tensor is
    F32; a Q8_0 ``output.weight`` stays quantized (GGUFLinear) and gives the reference logits to Q8_0 accuracy."""
    pytest.importorskip("gguf")
    from lens_core import quant_linear as ql

    folder, _, ours = lm
    path = fixtures.write_gguf_te(tmp_path / "gpt-oss-lm.gguf", None, folder=folder, float_type=float_type,
                                  fused=fused, embed_type="F32")
    te = ck.load_text_encoder(path, dtype=torch.float32, selected_layers=(1,))
    assert te.lens_checkpoint.family == "gguf-text-encoder" and not E.generator_for(te).ready
    gen = E.load_generation_weights(te)
    ref_gen = E.generator_for(ours)
    assert gen.ready and len(gen.decoder_layers()) == len(ref_gen.decoder_layers())
    ids = _prompt(6)
    new, logits = E.generate(te, ids, 16, eos_token_ids=(), output_logits=True)
    ref, ref_logits = E.generate(ours, ids, 16, eos_token_ids=(), output_logits=True)
    if float_type == "F32":
        assert torch.equal(gen.lm_head.weight, ref_gen.lm_head.weight)
        assert torch.equal(new, ref)
        assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits))
    else:
        assert isinstance(gen.lm_head, ql.GGUFLinear) and isinstance(gen.decoder_layers()[-1].self_attn.q_proj,
                                                                      ql.GGUFLinear)
        assert rel_err(logits[0], ref_logits[0]) < 0.05


def test_nvfp4_file_has_no_lm_head(golden_dir, tokenizer_json, tmp_path):
    path = fixtures.write_comfy_te_nvfp4(tmp_path / "gpt_oss_20b_nvfp4.safetensors", golden_dir, tokenizer_json)
    te = ck.load_text_encoder(path, dtype=torch.float32, selected_layers=(1, 3, 4, 5),
                              config=fixtures.te_config(golden_dir) | {"tie_word_embeddings": False})
    n_layers, keys = len(te.model.layers), set(te.state_dict())
    with pytest.raises(ck.CheckpointError, match=r"gpt_oss_20b_nvfp4.*lm_head.*text_encoder/ folder"):
        E.load_generation_weights(te)
    assert not E.generator_for(te).ready and len(te.model.layers) == n_layers and set(te.state_dict()) == keys
    ids = torch.tensor([[200006, 17360, 200008, 64, 3592]])
    assert te(ids)[0].shape == (1, 5, 64)


def test_bad_arguments(lm):
    _, _, ours = lm
    ids = _prompt(0)
    for kw, match in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                      (dict(temperature=float("nan")), "temperature"), (dict(seed=-3, temperature=1.0), "seed"),
                      (dict(top_k=-1), "top_k")):
        with pytest.raises(ValueError, match=match):
            E.generate(ours, ids, **{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match="input_ids"):
        E.generate(ours, torch.tensor([[1, 300]]), 2)
    with pytest.raises(ValueError, match="input_ids"):
        E.generate(ours, ids.float(), 2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        E.generate(ours, ids, 131072)
    with pytest.raises(ValueError, match="load_weights"):
        TextGenerator(ck.load_text_encoder(lm[0], dtype=torch.float32, selected_layers=(1,))).logits_step(ids, None)
    with pytest.raises(ValueError, match="load_generation_weights"):
        E.generate(TextGenerator(ck.load_text_encoder(lm[0], dtype=torch.float32, selected_layers=(1,))), ids, 2)


def test_real_size_memory_on_meta():
    """Resident bytes of the real-size enhancer (feature encoder + final norm + lm_head), by arithmetic on meta."""
    te = T.LensTextEncoder(T.TextEncoderConfig(), device="meta", dtype=torch.bfloat16)
    base = module_bytes(te)
    gen = TextGenerator(te)
    assert list(gen.state_dict()) == ["model.norm.weight", "lm_head.weight"]
    assert module_bytes(te) == base
    full = base + module_bytes(gen)
    print(f"real GPT-OSS-20B enhancer: {full / 1e9:.3f} GB resident = feature encoder {base / 1e9:.3f} GB + "
          f"lm_head/norm {(full - base) / 1e9:.3f} GB; KV cache for 600 + 4096 tokens bf16: "
          f"{24 * 2 * 8 * 64 * 4696 * 2 / 1e6:.0f} MB")
    assert 12.5e9 <= base <= 12.7e9 and 1.15e9 <= full - base <= 1.17e9


def test_pipeline_and_cli_enhance(pipeline_dir, tmp_path, capsys):
    """CLI --enhance prints the rewritten prompt and stores both prompts in the PNG; the API gives the same."""
    from PIL import Image

    from lens_core.__main__ import main
    from lens_core.pipeline import LensPipeline

    prompt = "a red cube on a wooden table"
    out = tmp_path / "e.png"
    rc = main(["generate", "--model", str(pipeline_dir), "--prompt", prompt, "--height", "32", "--width", "32",
               "--steps", "1", "--seed", "3", "--device", "cpu", "--dtype", "fp32", "--enhance",
               "--enhance-max-new-tokens", "6", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    line = next(s for s in printed.splitlines() if s.startswith("enhanced prompt: "))
    enhanced = line[len("enhanced prompt: "):]
    meta = json.loads(Image.open(out).text["lens"])
    assert meta["original_prompt"] == prompt and meta["prompt"] == enhanced
    assert f"Original prompt (enhanced by the Lens reasoner): {prompt}" in Image.open(out).text["parameters"]
    pipe = LensPipeline.from_pretrained(pipeline_dir, dtype=torch.float32, device="cpu",
                                        enhance={"max_new_tokens": 6})
    assert pipe.enhance(prompt, seed=3) == enhanced
    res = pipe(prompt, height=32, width=32, steps=1, seed=3)
    assert res.parameters["prompt"] == enhanced and res.parameters["original_prompt"] == prompt
    assert res.images[0].tobytes() == Image.open(out).tobytes()
    assert main(["generate", "--model", str(pipeline_dir), "--prompt", "x", "--enhance-max-new-tokens", "5",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "--enhance-max-new-tokens" in capsys.readouterr().err
