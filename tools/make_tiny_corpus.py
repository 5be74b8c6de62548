"""Generate the tiny training corpus and tokenizer that ship with the package (deterministic).

    python tools/make_tiny_corpus.py            # rewrites megatron_longgen/assets/tiny_stories.txt
                                                # and megatron_longgen/assets/tiny_sp.model

The corpus is synthetic English from templates (no licence questions, ~1.5 MB): each document introduces
a few characters with attributes and then refers back to them many sentences later, so a model that can
look far back (full or sink/strided layers) has something to learn beyond local grammar. Documents are
separated by a blank line. The tokenizer is a Llama-2-format SentencePiece BPE model (byte fallback,
unk/bos/eos = 0/1/2) trained on that corpus.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

NAMES = [
    "Ada",
    "Bruno",
    "Clara",
    "Dmitri",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Leon",
    "Maya",
    "Nils",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
    "Umar",
    "Vera",
    "Wim",
    "Xenia",
    "Yusuf",
    "Zoe",
]
CITIES = [
    "Lisbon",
    "Oslo",
    "Quito",
    "Nairobi",
    "Kyoto",
    "Lima",
    "Tunis",
    "Riga",
    "Perth",
    "Hanoi",
    "Bergen",
    "Cusco",
    "Dakar",
    "Leeds",
    "Porto",
    "Sofia",
]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "black", "white", "golden"]
ANIMALS = ["cat", "dog", "parrot", "horse", "goat", "rabbit", "turtle", "owl", "fox", "donkey"]
OBJECTS = [
    "lantern",
    "compass",
    "violin",
    "kettle",
    "notebook",
    "telescope",
    "bicycle",
    "map",
    "clock",
    "kite",
]
JOBS = ["baker", "sailor", "teacher", "farmer", "painter", "doctor", "miner", "weaver", "pilot", "gardener"]
VERBS = ["walked to", "sailed to", "rode to", "wrote about", "dreamed of", "returned to", "visited", "left"]
TIMES = [
    "In the morning",
    "At noon",
    "Later that day",
    "In the evening",
    "At night",
    "The next day",
    "Years later",
    "One winter",
    "Every spring",
    "Before dawn",
]
FILLER = [
    "The wind moved slowly over the hills and the river kept its quiet song.",
    "Nobody in the market spoke of the storm, though everyone had seen the clouds.",
    "The old road was long, and the stones were warm from the sun.",
    "A bell rang twice in the distance, and the birds rose from the trees.",
    "Bread was cheap that year, and the harvest had been good.",
    "The children counted the boats in the harbour and lost count at forty.",
    "Rain fell on the roofs, and the streets shone like glass.",
    "The library was closed, but the window was open and the lamps were lit.",
]


def make_document(rng: random.Random) -> str:
    cast = rng.sample(NAMES, 3)
    facts = {
        n: dict(
            city=rng.choice(CITIES),
            color=rng.choice(COLORS),
            animal=rng.choice(ANIMALS),
            obj=rng.choice(OBJECTS),
            job=rng.choice(JOBS),
        )
        for n in cast
    }
    lines = []
    for n in cast:
        f = facts[n]
        lines.append(
            f"{n} was a {f['job']} from {f['city']}. {n} had a {f['color']} {f['animal']} "
            f"and carried an old {f['obj']} everywhere."
        )
    for _ in range(rng.randint(12, 30)):
        roll = rng.random()
        n = rng.choice(cast)
        f = facts[n]
        if roll < 0.35:
            lines.append(rng.choice(FILLER))
        elif roll < 0.6:
            lines.append(f"{rng.choice(TIMES)}, {n} {rng.choice(VERBS)} {rng.choice(CITIES)}.")
        elif roll < 0.8:
            other = rng.choice([c for c in cast if c != n])
            lines.append(
                f"{n} met {other}, and they talked about the {facts[other]['color']} "
                f"{facts[other]['animal']}."
            )
        else:
            lines.append(
                f"Question: what did {n} carry? Answer: {n} carried the {f['obj']}, "
                f"and the {f['animal']} was {f['color']}."
            )
    return " ".join(lines)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out-dir", default=str(Path(__file__).resolve().parents[1] / "megatron_longgen" / "assets")
    )
    parser.add_argument("--num-docs", type=int, default=950)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=2410)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    text = "\n\n".join(make_document(rng) for _ in range(args.num_docs)) + "\n"
    corpus = out / "tiny_stories.txt"
    write_atomic(corpus, text.encode())

    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "tiny_sp")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=args.vocab_size,
            byte_fallback=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            character_coverage=1.0,
            num_threads=1,
            minloglevel=2,
        )
        write_atomic(out / "tiny_sp.model", Path(prefix + ".model").read_bytes())
    print(f"wrote {corpus} ({len(text) / 1e6:.2f} MB, {args.num_docs} documents) and {out / 'tiny_sp.model'}")


if __name__ == "__main__":
    main()
