import json

from tokenizers import Tokenizer


def test_rebuilt_tokenizer_reproduces_golden_ids(tokenizer_json, golden_dir):
    tok = Tokenizer.from_file(str(tokenizer_json))
    data = json.loads((golden_dir / "tokenizer_ids.json").read_text())
    assert tok.get_vocab_size(with_added_tokens=True) == 201088
    for entry in data["entries"]:
        ids = tok.encode(entry["rendered"], add_special_tokens=False).ids
        assert ids == entry["input_ids"], entry["prompt"]
        assert len(ids) == entry["num_tokens"]
        assert ids[data["crop"]:] == entry["kept_ids_after_crop_97"]
