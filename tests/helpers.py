"""Shared test helpers."""


from pathlib import Path

import torch

from sakimi_next.config import Config


ROOT = Path(__file__).resolve().parents[1]
def _find_shared_data() -> Path:
    """The shared corpora: $SAKIMI_SHARED_DATA, else ../shared/data beside the checkout, else the
    workspace's /work/shared/data (a clone elsewhere still finds them)."""
    import os

    candidates = [os.environ.get("SAKIMI_SHARED_DATA"), ROOT / ".." / "shared" / "data", "/work/shared/data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c).resolve()
    return (ROOT / ".." / "shared" / "data").resolve()


SHARED_DATA = _find_shared_data()


def small_config(**overrides) -> Config:
    """A model small enough to test quickly on CPU; Qwen3-Next shapes otherwise."""
    base = dict(
        vocab_size=160, hidden_size=64, num_hidden_layers=4, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        max_position_embeddings=1024,
    )
    base.update(overrides)
    return Config(**base)


def hf_twin(model, attn_implementation: str = "eager"):
    """transformers.Qwen3NextForCausalLM with a copy of `model`'s weights."""
    from sakimi_next.interop import to_transformers

    return to_transformers(model, attn_implementation)


def read_head(path: Path, n_bytes: int) -> str:
    """The first n_bytes of a UTF-8 file, cut at a character boundary."""
    return path.read_bytes()[:n_bytes].decode("utf-8", errors="ignore")


def mixed_corpus() -> str:
    """~100 KB of English and Chinese from ../shared/data (the CI smoke-test budget)."""
    return (read_head(SHARED_DATA / "tinystories" / "tinystories_mini.txt", 50_000) + "\n\n"
            + read_head(SHARED_DATA / "zh_novels" / "hongloumeng.txt", 50_000))


def train_briefly(model, vocab_limit: int, steps: int = 3, seed: int = 0):
    """A few AdamW steps on random tokens, so no weight keeps its initial value."""

    from sakimi_next.train import build_optimizer

    g = torch.Generator().manual_seed(seed)
    opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95))
    model.train()
    for _ in range(steps):
        x = torch.randint(0, vocab_limit, (2, 33), generator=g)
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def make_checkpoint(out_dir: Path, model, tokenizer, step: int = 3, optimizer=None, preset_name="custom"):
    """Save `model` as a training checkpoint with `tokenizer`, as --mode train would."""
    from sakimi_next.checkpoint import save_checkpoint

    state = {"preset": preset_name, "tokens_seen": 0, "args": {"seq_len": 32}, "tokenizer_sha256": tokenizer.sha256}
    return save_checkpoint(out_dir, step, model, optimizer, state, model.config, tokenizer.path)
