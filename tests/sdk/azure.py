"""The official Python SDK's AzureOpenAI client against BASE (an Azure
resource's endpoint): an image and a chat completion on deployment paths,
then the v1 API through the OpenAI client. Prints what it saw, without ids,
one fact a line."""
import os

from openai import AzureOpenAI, OpenAI

client = AzureOpenAI(
    azure_endpoint=os.environ["BASE"],
    api_key="az-client-key",
    api_version="2025-04-01-preview",
    max_retries=0,
)

image = client.images.generate(model="img-east", prompt="a lighthouse at dawn", size="1024x1024", quality="low")
print("image", len(image.data), len(image.data[0].b64_json) > 0, image.created > 0)

chat = client.chat.completions.create(
    model="chat-east",
    messages=[{"role": "user", "content": "say hello"}],
    max_tokens=20,
)
print("chat", chat.choices[0].message.content, chat.usage.total_tokens)

v1 = OpenAI(base_url=os.environ["BASE"] + "/openai/v1/", api_key="az-client-key", max_retries=0)
again = v1.images.generate(model="img-east", prompt="a lighthouse at dusk", size="1024x1024", quality="low")
print("v1 image", len(again.data), len(again.data[0].b64_json) > 0)
