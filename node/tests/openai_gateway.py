"""Drives `hashgrid serve` with the official `openai` Python package, as a business's software
would. Run by node/tests/gateway_openai.rs against a local grid of real site processes.

Environment: HASHGRID_BASE_URL (http://127.0.0.1:PORT/v1), HASHGRID_API_KEY, HASHGRID_CHAT_MODEL,
HASHGRID_EMBED_MODEL. Prints one JSON object with what it saw; exits non-zero on a failed check.
"""

import json
import math
import os
import sys

import openai

base = os.environ["HASHGRID_BASE_URL"]
key = os.environ["HASHGRID_API_KEY"]
chat_model = os.environ["HASHGRID_CHAT_MODEL"]
embed_model = os.environ["HASHGRID_EMBED_MODEL"]
QUESTION = "What is the capital of France? Answer in one sentence."

client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)
seen = {}

# Models.
ids = sorted(m.id for m in client.models.list().data)
assert ids == sorted([chat_model, embed_model]), ids
seen["models"] = ids

# Chat, not streamed (greedy), with the market's side in the response.
raw = client.chat.completions.with_raw_response.create(
    model=chat_model,
    messages=[{"role": "user", "content": QUESTION}],
    temperature=0,
    max_tokens=24,
)
chat = raw.parse()
text = chat.choices[0].message.content
assert text, chat
assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0, chat.usage
assert raw.headers.get("x-hashgrid-backend") == "market", dict(raw.headers)
extra = chat.model_extra["hashgrid"]
assert extra["backend"] == "market" and extra["receipt_id"] and extra["provider"], extra
assert raw.headers["x-hashgrid-receipt"] == extra["receipt_id"]
assert int(raw.headers["x-hashgrid-charge-msat"]) == extra["charge_msat"] > 0, extra
seen["chat"] = {"text": text, "finish_reason": chat.choices[0].finish_reason,
                "receipt_id": extra["receipt_id"], "charge_msat": extra["charge_msat"]}

# Chat, streamed: the same text, in more than one chunk, ending with a finish reason.
pieces = []
finish = None
receipt = None
usage = None
stream = client.chat.completions.create(
    model=chat_model,
    messages=[{"role": "user", "content": QUESTION}],
    temperature=0,
    max_tokens=24,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    if not chunk.choices:
        continue
    c = chunk.choices[0]
    if c.delta.content:
        pieces.append(c.delta.content)
    if c.finish_reason:
        finish = c.finish_reason
        receipt = chunk.model_extra.get("hashgrid", {}).get("receipt_id")
streamed = "".join(pieces)
assert streamed == text, (streamed, text)
assert len(pieces) > 1, pieces
assert finish == seen["chat"]["finish_reason"], finish
assert receipt and receipt != seen["chat"]["receipt_id"], receipt
assert usage and usage.completion_tokens == chat.usage.completion_tokens, usage
seen["stream"] = {"chunks": len(pieces), "receipt_id": receipt}

# Completions (plain text continuation) with a stop sequence.
comp = client.completions.create(
    model=chat_model, prompt="The capital of France is", max_tokens=12, temperature=0, stop=["."]
)
ctext = comp.choices[0].text
assert ctext and "." not in ctext, ctext
assert comp.choices[0].finish_reason == "stop", comp
seen["completion"] = ctext

# Embeddings: the SDK asks for base64 and decodes it; sentence-transformers' published
# similarity for these two sentences is 0.7553.
emb = client.embeddings.create(
    model=embed_model,
    input=["A man is eating food.", "A man is eating a piece of bread."],
)
a, b = emb.data[0].embedding, emb.data[1].embedding
assert len(a) == len(b) == 384, (len(a), len(b))
cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
assert round(cos, 3) == 0.755, cos
floats = client.embeddings.create(model=embed_model, input="A man is eating food.", encoding_format="float")
assert max(abs(x - y) for x, y in zip(floats.data[0].embedding, a)) < 1e-6
seen["embedding_cosine"] = cos

# Errors in OpenAI's shapes.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.code == "model_not_found", e
try:
    client.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": "hi"}], temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400, e
try:
    openai.OpenAI(base_url=base, api_key="wrong-key", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e
seen["errors"] = "ok"

print(json.dumps(seen))
