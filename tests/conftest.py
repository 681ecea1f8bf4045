"""Shared fixtures: tiny random models built from configs, a tiny trained tokenizer, and the real
SmolLM2 / Gemma-3 models (session-scoped) for integration tests.

Nothing here downloads anything, and nothing may install packages: ``PIP_NO_INDEX`` is set for
the whole session and TransformerLens' run-time ``pip install torchvision`` is disabled.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COUNTERFACT = SHARED / "data" / "counterfact_filtered.json"

os.environ["PIP_NO_INDEX"] = "1"  # any surprise `pip install` fails loudly
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests/ (for ``from conftest import ...``) and tests/unit/viz (``from test_viz import make_result``
# in the report tests) are importable from any test folder.
for _helpers in (Path(__file__).parent / "unit" / "viz", Path(__file__).parent):
    sys.path.insert(0, str(_helpers))

CORPUS = [
    "The capital of France is Paris.", "The capital of Japan is Tokyo.", "Water is made of hydrogen and oxygen.",
    "Paris is the capital of France.", "The Eiffel Tower is located in the city of Paris.",
    "The city famous for its Carnival in Brazil is Rio de Janeiro.", "Ça va ? 東京は日本の首都です。",
    "The Colosseum is in Rome. Berlin is in Germany. Madrid is in Spain.",
]


def block_transformer_lens_installs() -> None:
    """TransformerLens may run ``pip install torchvision`` for multimodal models: disable it."""
    try:
        import transformer_lens.model_bridge.sources.transformers.helpers as tl_helpers  # noqa: PLC0415
    except ImportError:  # older/newer layout: PIP_NO_INDEX still makes any install fail
        return
    tl_helpers._ensure_torchvision = lambda *a, **k: False


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) trained on a few sentences, offline, GPT-2 style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def bos_tokenizer(tiny_tokenizer):
    """:func:`tiny_tokenizer` that adds a BOS ``<s>`` in front of every text, as Gemma's does."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


def _tiny(kind: str, vocab: int, **over):
    """A random tiny model of ``kind``; ``over`` overrides any config field (layer counts too)."""
    import transformers as tf

    torch.manual_seed(0)
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM,
                  dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=128)),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
                 dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=16, max_position_embeddings=128)),
        "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM,
                 dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, bos_token_id=1, eos_token_id=2)),
        "neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
                 dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128)),
    }
    if kind not in configs:
        raise ValueError(kind)
    config_cls, model_cls, fields = configs[kind]
    return model_cls(config_cls(vocab_size=vocab, **{**fields, **over}))


@pytest.fixture(scope="session")
def make_tiny(tiny_tokenizer):
    """Factory: ``make_tiny("llama"|"gpt2"|"gemma3"|"gptj"|"neox", **config_overrides)`` -> ProbeModel
    (random weights, seed 0, fp32, eval)."""
    import probe

    def _make(kind: str = "llama", **over):
        hf = _tiny(kind, len(tiny_tokenizer), **over).eval()
        return probe.wrap_model(hf, tiny_tokenizer, name=f"tiny-{kind}")

    return _make


@pytest.fixture
def tiny_llama(make_tiny):
    return make_tiny("llama")


def build_tiny_llava(tokenizer, **text_over):
    """A random tiny LLaVA (CLIP 1 layer, d=32, 64 px; Llama 2 layers, d=64), seed 0, eval mode;
    ``text_over`` overrides the language model's config."""
    import transformers as tf

    torch.manual_seed(0)
    vocab = len(tokenizer) + 1
    cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=64, patch_size=32),
        text_config=tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   **text_over),
        image_token_id=vocab - 1)
    return tf.LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llava(tiny_tokenizer):
    """The tiny LLaVA of :func:`build_tiny_llava` as a ProbeModel."""
    import probe

    return probe.wrap_model(build_tiny_llava(tiny_tokenizer), tiny_tokenizer, name="tiny-llava")


def build_tiny_vlm(tokenizer):
    """A random tiny LLaVA with a real processor: the tokenizer (copied) gains ``<image>``, the
    LlavaProcessor expands it into 4 image tokens (64 px, patch 32, CLS dropped). Returns
    ``(hf_model, tokenizer, processor)``."""
    import copy

    import transformers as tf

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<image>"], special_tokens=True)
    iid = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=64, patch_size=32),
        text_config=tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
        image_token_id=iid, vision_feature_select_strategy="default", vision_feature_layer=-1)
    hf = tf.LlavaForConditionalGeneration(cfg).eval()
    improc = tf.CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    proc = tf.LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=32,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return hf, tok, proc


@pytest.fixture(scope="session")
def tiny_vlm(tiny_tokenizer):
    """:func:`build_tiny_vlm` as a multimodal ProbeModel (takes image prompts)."""
    import probe

    hf, tok, proc = build_tiny_vlm(tiny_tokenizer)
    return probe.wrap_model(hf, tok, name="tiny-vlm", processor=proc)


@pytest.fixture
def images(tmp_path):
    """Three distinct 64-px RGB images saved as PNG; returns their paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (SmolLM2-135M-Instruct, fp32), loaded once per session."""
    import probe

    return probe.load_model()


@pytest.fixture(scope="session")
def gemma():
    """The real Gemma-3-270M (optional extra; the README's test command installs it)."""
    import probe

    return probe.load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def counterfact_path():
    if not COUNTERFACT.is_file():
        pytest.fail(f"{COUNTERFACT} is missing: tests read CounterFact from ../shared/data")
    return COUNTERFACT


def teach_tiny_llama(tokenizer, facts, *, name: str = "tiny-llama"):
    """A random tiny Llama (seed 0) taught ``facts`` ("{prompt} {answer}") by 150 Adam steps (lr 3e-3,
    one thread, seeded): a small model that knows a handful of facts, for the job tests."""
    import probe

    hf = _tiny("llama", len(tokenizer)).eval()
    model = probe.wrap_model(hf, tokenizer, name=name)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        enc = tokenizer([f"{f.prompt} {f.answer}" for f in facts], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        opt = torch.optim.Adam(hf.parameters(), lr=3e-3)
        hf.train()
        for _ in range(150):
            loss = hf(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        hf.eval()
    finally:
        torch.set_num_threads(threads)
    return model
