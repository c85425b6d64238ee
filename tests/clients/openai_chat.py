"""The official `openai` client against `asagi-gguf serve`: a streamed chat with an image, then the same request
not streamed. Prints one JSON object for tests/openai_client.rs to check.

usage: python openai_chat.py PORT IMAGE QUESTION API_KEY
"""
import base64
import json
import sys

from openai import OpenAI

port, image, question, key = sys.argv[1:5]
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
with open(image, "rb") as f:
    url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]

text, events, finish, usage = "", 0, None, None
stream = client.chat.completions.create(model="asagi", messages=messages, stream=True,
                                        stream_options={"include_usage": True})
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    if chunk.choices:
        delta = chunk.choices[0].delta.content
        if delta:
            text += delta
            events += 1
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason

plain = client.chat.completions.create(model="asagi", messages=messages)
print(json.dumps({
    "streamed": text,
    "events": events,
    "finish": finish,
    "completion_tokens": usage.completion_tokens if usage else None,
    "plain": plain.choices[0].message.content,
    "plain_finish": plain.choices[0].finish_reason,
}, ensure_ascii=False))
