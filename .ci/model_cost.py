#!/usr/bin/env python3
"""What one text costs the model: stock VADER against webhookd's, plain text against emoji.

    python .ci/model_cost.py

Texts of the same length in characters: plain English, one emoji repeated, mixed emoji (VADER
turns each into several words), and a "but" with distinct scores around it. Stock VADER is
skipped past 4,000 characters of emoji, where it takes seconds to a minute.
Not part of the test suite: a measurement, run by hand.
"""
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import webhookd  # noqa: E402
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: E402

stock, linear = SentimentIntensityAnalyzer(), webhookd._linear_vader()
draw = random.Random(1)
plain = "The support team was fantastic and fixed it in minutes, but the app is slow. " * 200
words = [w for w in stock.lexicon if w.isalpha()]
print(f"{'chars':>6} {'text':15} {'stock ms':>10} {'webhookd ms':>12}")
for n in (500, 2000, 4000, 10000):
    texts = {
        "plain": plain[:n],
        "emoji": "😀" * n,
        "emoji mix": "".join(draw.choice(list(stock.emojis)) for _ in range(n)),
        "but + distinct": ("but " + " ".join(draw.choice(words) for _ in range(n)))[:n],
    }
    for name, text in texts.items():
        timings = []
        for analyzer in (stock, linear):
            if analyzer is stock and n > 4000 and name.startswith("emoji"):
                timings.append(float("nan"))
                continue
            start = time.perf_counter()
            analyzer.polarity_scores(text)
            timings.append((time.perf_counter() - start) * 1000)
        print(f"{n:6} {name:15} {timings[0]:10.1f} {timings[1]:12.1f}")
