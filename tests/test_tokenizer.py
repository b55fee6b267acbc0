import numpy as np

from clippy_ray import storage
from clippy_ray.config import TextConfig
from clippy_ray.tokenizer import build_tokenizer

CAPTIONS = ["a red circle on a striped background", "two blue stars", "a green heart and a ring"]


def test_byte_tokenizer_needs_no_file_and_pads_to_max_length():
    tok = build_tokenizer(TextConfig(tokenizer="byte", max_length=12))
    out = tok(["ab", "a much longer caption than twelve bytes"])
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 12)
    assert out["input_ids"].dtype == np.int64
    assert out["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 9  # 'a', 'b', </s>
    assert out["attention_mask"][1].all()  # truncated


def test_an_empty_batch_gives_empty_arrays():
    out = build_tokenizer(TextConfig(tokenizer="byte", max_length=12))([])
    assert out["input_ids"].shape == out["attention_mask"].shape == (0, 12)


def test_saved_tokenizer_reloads_from_a_local_folder_and_s3_with_identical_ids(tmp_path, bucket):
    tok = build_tokenizer(TextConfig(tokenizer="byte"))
    tok.save(tmp_path / "tok")
    storage.upload(tmp_path / "tok", f"s3://{bucket}/tok")
    for uri in (str(tmp_path / "tok"), f"s3://{bucket}/tok"):
        again = build_tokenizer(TextConfig(tokenizer=uri))
        np.testing.assert_array_equal(again(CAPTIONS)["input_ids"], tok(CAPTIONS)["input_ids"])


def test_a_t5_spiece_model_folder_is_used_as_t5s_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text("\n".join(CAPTIONS * 20))
    folder = tmp_path / "t5tok"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(folder / "spiece"),
        vocab_size=30,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
    )
    (folder / "spiece.vocab").unlink()
    tok = build_tokenizer(TextConfig(tokenizer=str(folder), max_length=16))
    proc = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    ids = tok(["two blue stars"])["input_ids"][0]
    expected = proc.encode("two blue stars") + [1]  # T5 appends </s>
    assert ids[: len(expected)].tolist() == expected
    assert (ids[len(expected) :] == 0).all()
