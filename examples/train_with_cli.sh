#!/usr/bin/env bash
# Train two prefixes in one run with the CLI, on the demo model (nothing to download), then serve
# both with one server. With a real model add `--model PATH` to both commands.
#   bash examples/train_with_cli.sh [OUT]          STEPS=20 bash examples/train_with_cli.sh (quicker)
set -euo pipefail
OUT=${1:-prefix-out-two-tasks}
STEPS=${STEPS:-300}
mkdir -p "$OUT"
python3 - "$OUT" <<'PY'
import json, random, sys
out = sys.argv[1]
rng = random.Random(0)
good, bad = ["great", "lovely", "superb", "fun"], ["dull", "awful", "boring", "flat"]
topics = {"sport": ["goal", "match", "team", "coach"], "food": ["soup", "bread", "spice", "cake"]}
with open(f"{out}/sentiment.jsonl", "w") as f:
    for _ in range(200):
        label = rng.choice(["positive", "negative"])
        word = rng.choice(good if label == "positive" else bad)
        f.write(json.dumps({"prompt": f"review: a {word} film. sentiment:", "completion": f" {label}"}) + "\n")
with open(f"{out}/topic.jsonl", "w") as f:
    for _ in range(200):
        topic = rng.choice(sorted(topics))
        f.write(json.dumps({"prompt": f"text: the {rng.choice(topics[topic])} was late. topic:",
                            "completion": f" {topic}"}) + "\n")
PY
# one pass of the frozen model per batch: each row trains its own task's prefix
# (PREFIX_KERNELS="python3 -m prefix_kernels.cli" runs a checkout without installing it)
${PREFIX_KERNELS:-prefix-kernels} train --task sentiment="$OUT/sentiment.jsonl" --task topic="$OUT/topic.jsonl" \
    --out "$OUT" --steps "$STEPS" --warmup-steps 10 --lr-schedule cosine --quiet
ls "$OUT/adapters"
echo "serve both:  prefix-kernels serve --prefix sentiment=$OUT/adapters/sentiment --prefix topic=$OUT/adapters/topic"
