"""Shared test helpers."""


from pathlib import Path

import torch

from sakimi_next.config import Config


ROOT = Path(__file__).resolve().parents[1]

# ~500 of the most common Chinese characters: the alphabet of `chinese_text`
COMMON_HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定"
    "行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其"
    "些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建"
    "月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接"
    "知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器"
    "压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议"
    "声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复"
    "容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标"
    "写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严龙飞宝玉笑道"
)


def chinese_text(n_chars: int = 30_000, seed: int = 0) -> str:
    """Deterministic Chinese-looking prose: a Zipf-distributed lexicon of one- to three-character words
    over COMMON_HANZI, sentences of 3-12 words ending in Chinese punctuation, sometimes quoted speech,
    one paragraph per line (no blank lines, like a novel)."""
    import random

    rng = random.Random(seed)
    lexicon = ["".join(rng.choice(COMMON_HANZI) for _ in range(rng.choice((1, 2, 2, 2, 3)))) for _ in range(400)]
    weights = [1 / (rank + 1) for rank in range(len(lexicon))]
    lines, size = [], 0
    while size < n_chars:
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = rng.choices(lexicon, weights, k=rng.randint(3, 12))
            cut = rng.randint(1, len(words))
            sentence = "".join(words[:cut]) + ("，" + "".join(words[cut:]) if cut < len(words) else "")
            end = rng.choice("。。。！？")
            sentences.append(f"“{sentence}{end}”" if rng.random() < 0.2 else sentence + end)
        lines.append("".join(sentences))
        size += len(lines[-1]) + 1
    return "\n".join(lines) + "\n"


def english_text(n_bytes: int = 100_000) -> str:
    """The first ~`n_bytes` of the CPython documentation that ships with Python (the embedded corpus,
    `sakimi_next.data.builtin_source`), topics separated by blank lines, cut after a whole line."""
    from sakimi_next.data import builtin_topics

    raw = "\n\n".join(t.strip("\n") for t in builtin_topics()).encode("utf-8")[:n_bytes]
    return raw[:raw.rfind(b"\n") + 1].decode("utf-8")


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
    from sakimi_next.huggingface import to_transformers

    return to_transformers(model, attn_implementation)


def mixed_corpus() -> str:
    """~100 KB of English (the embedded CPython docs) and generated Chinese."""
    return english_text(50_000) + "\n\n" + chinese_text(17_000)


def train_briefly(model, vocab_limit: int, steps: int = 3, seed: int = 0):
    """A few AdamW steps on random tokens, so no weight keeps its initial value."""

    from sakimi_next.optim import build_optimizer

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


def make_checkpoint(out_dir: Path, model, tokenizer, step: int = 3, optimizer=None, preset_name="custom",
                    args: dict | None = None):
    """Save `model` as a training checkpoint with `tokenizer`, as --mode train would. By default as if
    trained on 32-token windows after a lead-in long enough that attention's default reach (the trained
    context, 4,096 positions) covers every text the tests read."""
    from sakimi_next.checkpoint import save_checkpoint

    state = {"preset": preset_name, "tokens_seen": 0, "args": args or {"seq_len": 32, "lead_in": 4064},
             "tokenizer_sha256": tokenizer.sha256}
    return save_checkpoint(out_dir, step, model, optimizer, state, model.config, tokenizer.path)


def free_port() -> str:
    """A port of 127.0.0.1 that nothing listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


TORCHRUN_TIMEOUT_S = 600
# 2 processes sum a gradient in another order than 1 process does (1e-5 of its norm at the first step
# on the 2-core EPYC), and the optimisers make such differences their own size: Adam's first steps move each
# weight by about the learning rate whatever its gradient's size, Muon's orthogonalisation lifts a
# matrix's smallest directions to one. Measured on an AVX512-BF16 EPYC over 4 steps, AdamW and Muon alike:
# losses within 5e-5 of each other, gradient norms within 2.3e-4. A wrong split or average is off by %.
TWO_PROCESSES_LOSS_REL, TWO_PROCESSES_NORM_REL = 2e-4, 1e-3


def torchrun(*args: str, module: str = "sakimi_next") -> str:
    """`python -m torch.distributed.run` with 2 processes on 127.0.0.1, one thread each, bounded in time (past
    it, the launcher and its workers are killed together: none is left holding the cores). Returns stdout."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                             "127.0.0.1", "--master-port", free_port(), "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    return out
