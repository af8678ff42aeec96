"""lens_core.prompt against the golden template strings and token ids (real o200k_harmony vocabulary)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lens_core import prompt as P

CASES = ["a_cfg1_4steps", "b_cfg5_6steps_emptyneg"]


@pytest.fixture(scope="module")
def golden_ids(golden_dir):
    return json.loads((golden_dir / "tokenizer_ids.json").read_text())


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return P.load_tokenizer(tokenizer_dir)


def test_render_matches_golden_strings(golden_ids):
    assert golden_ids["chat_date"] == P.DEFAULT_TEMPLATE_DATE
    for e in golden_ids["entries"]:
        assert P.render_prompt(e["prompt"]) == e["rendered"]
        assert P.render_prompt(e["prompt"], date="2026-05-23") == e["rendered"]


def test_ids_equal_golden_for_every_prompt(tok, golden_ids):
    assert tok.pad_id == 199999
    for e in golden_ids["entries"]:
        ids, mask = P.tokenize(tok, e["prompt"])
        assert ids.dtype == torch.long and mask.dtype == torch.bool
        assert ids[0].tolist() == e["input_ids"], e["prompt"]
        assert mask.all() and ids.shape == (1, e["num_tokens"])
        assert ids[0, P.PREAMBLE_TOKENS:].tolist() == e["kept_ids_after_crop_97"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ids_equal_pipeline_case_ids(tok, golden_dir, case, dtype):
    g = load_file(str(golden_dir / "pipeline_tiny" / "cases" / f"{case}.{dtype}.safetensors"))
    ids, mask = P.tokenize(tok, ["a red cube on a wooden table"])
    assert torch.equal(ids, g["pos_input_ids"])
    assert torch.equal(mask, g["pos_attention_mask"].bool())
    assert torch.equal(mask[:, P.PREAMBLE_TOKENS:], g["prompt_mask"])


def test_load_from_file_bytes_and_embedded_tensor(tokenizer_json, golden_ids):
    raw = tokenizer_json.read_bytes()
    want = golden_ids["entries"][3]["input_ids"]
    for src in (tokenizer_json, str(tokenizer_json), raw, torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                torch.frombuffer(bytearray(raw), dtype=torch.int8)):
        t = P.load_tokenizer(src)
        assert t.pad_id == 199999
        assert P.tokenize(t, golden_ids["entries"][3]["prompt"])[0][0].tolist() == want


def test_batch_of_different_lengths_is_right_padded(tok, golden_ids):
    entries = golden_ids["entries"]
    ids, mask = P.tokenize(tok, [e["prompt"] for e in entries])
    longest = max(e["num_tokens"] for e in entries)
    assert ids.shape == mask.shape == (len(entries), longest)
    for row, e in enumerate(entries):
        n = e["num_tokens"]
        assert ids[row, :n].tolist() == e["input_ids"]
        assert (ids[row, n:] == 199999).all()
        assert mask[row, :n].all() and not mask[row, n:].any()


def test_truncation_warns_with_dropped_count(tok):
    long = "cat " * 600
    n_full = len(tok.encode([P.render_prompt(long)])[0])
    with pytest.warns(UserWarning, match=f"{n_full - 512} tokens dropped"):
        ids, mask = P.tokenize(tok, ["a dog", long])
    assert ids.shape == (2, 512) and mask[1].all() and mask[0].sum() == 121
    assert ids[1].tolist() == tok.encode([P.render_prompt(long)])[0][:512]


def test_date_option(tok):
    ids_default, _ = P.tokenize(tok, "blurry")
    ids_other, _ = P.tokenize(tok, "blurry", date="2031-12-02")
    assert ids_default.shape == ids_other.shape
    assert (ids_default != ids_other).sum() > 0
    assert torch.equal(ids_default[:, P.PREAMBLE_TOKENS:], ids_other[:, P.PREAMBLE_TOKENS:])
    assert "Current date: 2031-12-02\n" in P.render_prompt("x", "2031-12-02")
    import datetime
    assert P.render_prompt("x", datetime.date(2030, 1, 2)) == P.render_prompt("x", "2030-01-02")
    today = datetime.datetime.now().strftime("%Y-%m-%d")
    assert f"Current date: {today}\n" in P.render_prompt("x", "today")
    for bad in ("23/05/2026", "2026-13-40", 20260523):
        with pytest.raises(ValueError, match="date"):
            P.render_prompt("x", bad)


def test_prompt_verbatim_and_return_cut(tok):
    assert "<|user|>  spaced \n<|end|>" in P.render_prompt("<|user|>  spaced \n")
    cut = P.render_prompt("a cat<|return|>ignored")
    assert cut.endswith("<|start|>user<|message|>a cat")
    ids, _ = P.tokenize(tok, "a <|end|> b")
    assert 200007 in ids[0, P.PREAMBLE_TOKENS:P.PREAMBLE_TOKENS + 4].tolist()


def test_bad_prompts():
    with pytest.raises(ValueError, match="expected a string"):
        P.render_prompt(None)
    t = P.LensTokenizer(None, "x", 0)
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a string, found int"):
        P.tokenize(t, ["ok", 3])
    with pytest.raises(ValueError, match="non-empty list"):
        P.tokenize(t, [])
    with pytest.raises(ValueError, match="LensTokenizer"):
        P.tokenize(object(), ["ok"])


def _tiny_tokenizer_json():
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t.to_str()


def test_missing_or_wrong_tokenizer_names_the_folder(tmp_path):
    empty = tmp_path / "no_tokenizer_here"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no_tokenizer_here"):
        P.load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        P.load_tokenizer(tmp_path / "does_not_exist")
    wrong = tmp_path / "wrong_vocab"
    (wrong / "tokenizer").mkdir(parents=True)
    (wrong / "tokenizer" / "tokenizer.json").write_text(_tiny_tokenizer_json())
    with pytest.raises(ValueError, match=r"wrong_vocab.*o200k_harmony.*97"):
        P.load_tokenizer(wrong)
    with pytest.raises(ValueError, match="embedded tokenizer.*97"):
        P.load_tokenizer(_tiny_tokenizer_json().encode())
    (wrong / "tokenizer" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="wrong_vocab"):
        P.load_tokenizer(wrong)
    with pytest.raises(ValueError, match="1-D uint8"):
        P.load_tokenizer(torch.zeros(3, dtype=torch.float32))


class _StubEncoder(torch.nn.Module):
    """Features = a fixed function of (id, position) per layer, so crop/mask/pad handling is checkable."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        base = (input_ids.double() * 1000 + pos).unsqueeze(-1).expand(-1, -1, 3)
        return [base + layer for layer in range(4)]


def test_encode_prompts_crops_97_and_pads(tok, golden_ids):
    enc = _StubEncoder()
    prompts = [golden_ids["entries"][0]["prompt"], golden_ids["entries"][2]["prompt"]]
    feats, mask = P.encode_prompts(enc, tok, prompts)
    assert len(feats) == 4 and all(f.shape == (2, 29, 3) for f in feats)
    assert mask.tolist()[0] == [True] * 29 and mask.tolist()[1] == [True] * 24 + [False] * 5
    ids0 = golden_ids["entries"][0]["kept_ids_after_crop_97"]
    for layer, f in enumerate(feats):
        want = torch.tensor([i * 1000 + 97 + p + layer for p, i in enumerate(ids0)], dtype=torch.double)
        assert torch.equal(f[0, :, 0], want)
    neg_f, neg_m = P.empty_negative(feats, mask)
    assert all(torch.equal(n, torch.zeros_like(f)) for n, f in zip(neg_f, feats))
    assert neg_m.shape == mask.shape and neg_m.dtype == torch.bool and not neg_m.any()
    # T <= 97 (only possible with max_length <= 97): zero-length features, as the official code.
    with pytest.warns(UserWarning, match="23 tokens dropped"):
        feats, mask = P.encode_prompts(enc, tok, ["x"], max_length=97)
    assert feats[0].shape == (1, 0, 3) and mask.shape == (1, 0)
