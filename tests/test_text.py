import os
import subprocess
import sys

import pytest
import torch

from imagen_transfer.errors import UserError
from imagen_transfer.text import EmbeddingCache, TextEncoderSpec, TinyTextEncoder, load_text_encoder


def test_tiny_encoder_shapes_and_determinism():
    enc = TinyTextEncoder(dim=32, max_length=20)
    out = enc(["a photo of a cat", "dog", ""])
    assert out.states.shape == (3, 20, 32) and out.mask.shape == (3, 20) and out.pooled.shape == (3, 32)
    assert out.mask.sum(1).tolist() == [6, 2, 1]  # a start token plus one per word
    again = TinyTextEncoder(dim=32, max_length=20)(["a photo of a cat"])
    assert torch.equal(out.states[0], again.states[0])
    assert not torch.allclose(out.pooled[0], out.pooled[1])
    assert torch.all(out.states[0, 6:] == 0), "padding positions carry nothing"


def test_cache_encodes_each_text_once_and_persists(tmp_path):
    enc = TinyTextEncoder()
    cache = EmbeddingCache(enc, tmp_path)
    first = cache(["cat", "dog", "cat"])
    assert cache.encoded == 2
    assert torch.equal(first.states[0], first.states[2])
    cache(["dog", "cat"])
    assert cache.encoded == 2, "cached texts must not be encoded again"
    fresh = EmbeddingCache(enc, tmp_path)  # a new process would see the files on disk
    second = fresh(["cat", "dog"])
    assert fresh.encoded == 0
    assert torch.equal(second.states, first.states[:2])
    assert len(list((tmp_path / enc.id).glob("*.safetensors"))) == 2


def test_unknown_encoder_is_a_user_error():
    with pytest.raises(UserError, match="unknown text encoder"):
        TextEncoderSpec.parse("clip")


@pytest.mark.slow
def test_minilm_loads_offline():
    """The registry package ships the weights: loading must work with the hub switched off."""
    code = (
        "from imagen_transfer.text import TextEncoderSpec, load_text_encoder;"
        "e = load_text_encoder(TextEncoderSpec.parse('minilm', 20)); o = e(['a photo of a cat', '']);"
        "print(tuple(o.states.shape), e.dim, o.mask.sum(1).tolist())"  # [CLS] a photo of a cat [SEP]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(2, 20, 384) 384 [7, 2]" in out.stdout


def test_t5_encoder_from_a_local_folder(tmp_path):
    """T5 loads from a path; a tiny random T5 with a T5 tokenizer built from the MiniLM vocabulary stands in."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from imagen_transfer.text import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    enc = load_text_encoder(TextEncoderSpec.parse(f"t5:{tmp_path / 't5'}", 20))
    out = enc(["chest x-ray, normal", "a cat"])
    assert out.states.shape == (2, 20, 16) and enc.dim == 16
    with pytest.raises(UserError, match="cannot load the t5 text encoder"):
        load_text_encoder(TextEncoderSpec.parse(f"t5:{tmp_path / 'missing'}", 20))(["x"])  # weights load on first use


def test_cached_captions_never_load_the_encoder_weights(tmp_path):
    """A carried embedding cache is enough: the encoder's weights are read only for a caption the cache lacks."""
    from imagen_transfer.text import EmbeddingCache, HFTextEncoder, TextEncoding

    def weights_folder() -> str:
        raise AssertionError("the encoder weights were loaded")

    encoder = HFTextEncoder(weights_folder, kind="minilm", max_length=8, name="model")
    assert encoder.id == "minilm-model-l8"  # the id of the installed MiniLM's cache entries
    EmbeddingCache(encoder, tmp_path)._write("chest x-ray", TextEncoding(torch.ones(1, 8, 4), torch.ones(1, 8),
                                                                        torch.ones(1, 4)))
    fresh = EmbeddingCache(encoder, tmp_path)
    assert fresh(["chest x-ray"]).states.shape == (1, 8, 4) and fresh.encoded == 0
    with pytest.raises(AssertionError, match="weights were loaded"):
        fresh(["a caption nobody encoded"])
