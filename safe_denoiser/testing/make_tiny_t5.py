"""Regenerate ``safe_denoiser/testing/data/tiny_t5/spiece.model``, the tiny T5 tokenizer the test pipelines use.

A sentencepiece Unigram model with T5's conventions (the settings of google's ``spiece.model``): ``<pad>`` 0,
``</s>`` 1, ``<unk>`` 2, no BOS, ``nmt_nfkc`` normalization, no byte fallback. It is trained once, here, on the small
English corpus below (digits, punctuation, accents, a few CJK characters) and committed: tests never train.

    .venv/bin/python -m safe_denoiser.testing.make_tiny_t5

Training is deterministic for a given sentencepiece version (one thread, a fixed seed); the committed file was made
with sentencepiece 0.2.3. A different version may pick slightly different pieces: the tests compare tokenizers on
the committed file, so regenerate only on purpose.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from safe_denoiser.testing.t5 import TINY_T5_FOLDER

MODEL_PATH = TINY_T5_FOLDER / "spiece.model"
SEED = 25
VOCAB_SIZE = 400  # pieces, before T5's 100 <extra_id_N> added tokens

# T5's special pieces and normalization; the rest keeps the model small and the training exact.
TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "unigram",
    "vocab_size": VOCAB_SIZE,
    "pad_id": 0,
    "eos_id": 1,
    "unk_id": 2,
    "bos_id": -1,
    "pad_piece": "<pad>",
    "eos_piece": "</s>",
    "unk_piece": "<unk>",
    "normalization_rule_name": "nmt_nfkc",
    "byte_fallback": False,
    "character_coverage": 1.0,
    "hard_vocab_limit": False,  # the corpus is small: fewer pieces than asked is fine
    "num_threads": 1,
    "max_sentencepiece_length": 12,
    "shuffle_input_sentence": False,
}

CORPUS = """\
a photograph of an astronaut riding a horse on the moon, highly detailed, 8k
a watercolor painting of a fox in a snowy forest at dawn
portrait of an old fisherman, dramatic lighting, 35mm film, f/1.8
a cozy café in Paris with a red awning; people reading newspapers.
the naïve artist painted a façade in the style of Monet (1840–1926)
a cat wearing sunglasses, digital art, trending on artstation!!!
Tokyo street at night (東京), neon signs, rain, reflections, cinematic
a bowl of ramen: noodles, egg, green onions & pork, food photography
mountains under a starry sky, 4k wallpaper, ultra wide angle, 16:9
a small robot watering plants in a greenhouse, soft light, 3d render
"a painting of a dog", said the curator; "no, a wolf!" replied the child.
The year 2024 had 366 days; 3.14159 is pi, and 1,000,000 is a million.
an oil painting of a lighthouse during a storm, waves crashing, 1890s
a minimalist logo of a mountain and a sun, vector, flat colors, #ff8800
a résumé on a wooden desk next to a cup of coffee — top view
a medieval castle on a hill, fantasy art, by an unknown painter
close-up of a hummingbird drinking nectar, macro lens, bokeh
a futuristic city with flying cars, cyberpunk, blade runner style
children playing football in the park on a sunny afternoon
a bouquet of roses and tulips in a glass vase, still life, 50% off
an ancient Greek statue of Athena, marble, museum lighting
a train crossing a bridge over a river in autumn, golden leaves
a jazz band playing in a smoky bar, 1920s, black and white photo
the Eiffel Tower at sunset, pastel colors, impressionism
a dragon sleeping on a pile of gold coins, epic, highly detailed
a map of an imaginary island with rivers, forests and villages
a snowman wearing a scarf and a hat, winter, Christmas card
a portrait of a woman with freckles and red hair, natural light
an underwater scene with coral reefs, fish and a sea turtle
a vintage car parked in front of a diner, route 66, 1950s
Cherry blossoms in Kyoto (京都), spring, a temple and a pond
a cup of green tea (お茶) on a bamboo mat, zen, calm
the quick brown fox jumps over the lazy dog. 0123456789
photo of a golden retriever puppy in the grass, 85mm, f/2.0
an abstract painting with circles, squares and triangles
a desert landscape with cacti and a red rock arch, Arizona
a steampunk airship above a Victorian city, brass and copper
a bowl of fruit: apples, bananas, grapes, oranges and pears
a knight in shining armor, holding a sword and a shield
a cottage by a lake surrounded by pine trees, morning mist
price: $19.99 (-20%), size 10 x 12 cm, weight 2.5 kg, 100°C
email me at hello@example.com or visit https://example.com/art?id=42
Über den Wolken: a zeppelin over München, señor García's piñata, crème brûlée
"""


def train(corpus: str = CORPUS) -> bytes:
    """The serialized model proto trained on ``corpus`` (one sentence per line) with ``TRAINER_SETTINGS``."""
    import sentencepiece as spm

    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()), model_writer=model, minloglevel=2, **TRAINER_SETTINGS
    )
    return model.getvalue()


def write_model(path: Path = MODEL_PATH) -> Path:
    """Train and write the model atomically (a temporary file in the same folder, then a rename)."""
    data = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tiny_t5-", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile makes 0600; the model is package data
    os.replace(tmp.name, path)
    return path


if __name__ == "__main__":
    written = write_model()
    print(f"wrote {written} ({written.stat().st_size} bytes)")
