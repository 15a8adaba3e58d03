"""Build chat fine-tuning data from English-Chinese sentence pairs (Tatoeba's cmn.txt: `English<TAB>Chinese`
a line, as in ../shared/data/cmn_eng/cmn.txt).

Each pair becomes one conversation: a user asks for a translation, in one direction or the other, in one
of several phrasings (in English or in Chinese), sometimes after a system message; the assistant answers
with the other sentence. Pairs are split into training and held-out sets by their English sentence, so no
held-out sentence (in either language) is seen in training. Seeded: the same input gives the same files.

    python scripts/make_translation_chats.py ../shared/data/cmn_eng/cmn.txt --out-dir data/chat-demo/chats
      -> train.jsonl, val.jsonl   one {"messages": [...]} per line, and `direction` ("zh" or "en": the
                                  language the reply should be in), which prepare_data ignores
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

INTO_CHINESE = [
    "Translate into Chinese: {s}",
    "How do you say \"{s}\" in Chinese?",
    "Please translate this sentence into Chinese.\n{s}",
    "把这句话翻译成中文：{s}",
    "“{s}”用中文怎么说？",
]
INTO_ENGLISH = [
    "Translate into English: {s}",
    "What does \"{s}\" mean in English?",
    "Please translate this sentence into English.\n{s}",
    "把这句话翻译成英文：{s}",
    "“{s}”用英语怎么说？",
]
SYSTEM = ["You are a translator between English and Chinese.", "你是一个中英翻译助手。"]


def read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            sys.exit(f"error: {path}:{lineno}: expected 'English<TAB>Chinese'")
        pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


def conversation(en: str, zh: str, rng: random.Random) -> dict:
    """One translation request and its answer; `direction` is the language the answer is in."""
    into_zh = rng.random() < 0.5
    ask = rng.choice(INTO_CHINESE if into_zh else INTO_ENGLISH).format(s=en if into_zh else zh)
    messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": zh if into_zh else en}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM)})
    return {"messages": messages, "direction": "zh" if into_zh else "en"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pairs", type=Path, help="cmn.txt: English<TAB>Chinese per line")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--val-pairs", type=int, default=300, help="held-out English sentences (with all their pairs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    pairs = read_pairs(args.pairs)
    rng = random.Random(args.seed)
    english = sorted({en for en, _ in pairs})
    held = set(rng.sample(english, args.val_pairs))
    split = {"train": [x for x in pairs if x[0] not in held], "val": [x for x in pairs if x[0] in held]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, items in split.items():
        rng.shuffle(items)
        lines = [json.dumps(conversation(en, zh, rng), ensure_ascii=False) + "\n" for en, zh in items]
        (args.out_dir / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
        print(f"{args.out_dir / (name + '.jsonl')}: {len(lines):,} conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
