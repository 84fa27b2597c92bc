"""The official Python SDK's responses.create against BASE: plain, streamed,
and with the image tool. Prints what it saw, without ids, one fact a line."""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["BASE"], api_key="sk-sdk", max_retries=0)

plain = client.responses.create(model="gpt-4.1-mini", input="say hello to the world", max_output_tokens=50)
print("plain", plain.status, plain.output_text, plain.usage.input_tokens, plain.usage.output_tokens)

chained = client.responses.create(
    model="gpt-4.1-mini",
    input=[{"role": "user", "content": [{"type": "input_text", "text": "and again"}]}],
    previous_response_id=plain.id,
)
print("chained", chained.previous_response_id == plain.id, chained.output_text)

types = []
with client.responses.stream(model="gpt-4.1-mini", input="stream these words please") as stream:
    for event in stream:
        types.append(event.type)
    final = stream.get_final_response()
print("stream", " ".join(types))
print("stream usage", final.usage.total_tokens, final.output_text)

image = client.responses.create(
    model="gpt-4.1-mini",
    input="a lighthouse at dawn",
    tools=[{"type": "image_generation", "quality": "low", "size": "1024x1024"}],
    tool_choice={"type": "image_generation"},
)
calls = [o for o in image.output if o.type == "image_generation_call"]
print("image", len(calls), len(calls[0].result) if calls else 0, image.usage.total_tokens)
