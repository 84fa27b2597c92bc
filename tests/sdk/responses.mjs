// The official Node SDK's responses.create against BASE: plain, streamed, and
// with the image tool. Prints what it saw, without ids, one fact a line.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.BASE, apiKey: "sk-sdk", maxRetries: 0 });

const plain = await client.responses.create({ model: "gpt-4.1-mini", input: "say hello to the world", max_output_tokens: 50 });
console.log("plain", plain.status, plain.output_text, plain.usage.input_tokens, plain.usage.output_tokens);

const stream = await client.responses.create({ model: "gpt-4.1-mini", input: "stream these words please", stream: true });
const types = [];
let usage = 0;
for await (const event of stream) {
  types.push(event.type);
  if (event.type === "response.completed") usage = event.response.usage.total_tokens;
}
console.log("stream", types.join(" "));
console.log("stream usage", usage);

const image = await client.responses.create({
  model: "gpt-4.1-mini",
  input: "a lighthouse at dawn",
  tools: [{ type: "image_generation", quality: "low", size: "1024x1024" }],
  tool_choice: { type: "image_generation" },
});
const calls = image.output.filter((o) => o.type === "image_generation_call");
console.log("image", calls.length, calls.length ? calls[0].result.length : 0, image.usage.total_tokens);
