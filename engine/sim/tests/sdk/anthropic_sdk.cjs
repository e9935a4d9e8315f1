// Drives the simulator with the official `@anthropic-ai/sdk` TypeScript SDK (its CommonJS build,
// so NODE_PATH can point at the installed copy), as a new user would: no extra headers, the
// SDK's own defaults (its API version, its way of sending the key).
//
// Usage: node anthropic_sdk.cjs BASE_URL MODEL
// BASE_URL is the server root without /v1 (the SDK adds /v1/messages). Prints one JSON object
// with what each call returned; the Rust test (engine/sim/tests/it/sdk.rs) checks it.

'use strict';

const Anthropic = require('@anthropic-ai/sdk');
const { VERSION: sdkVersion } = require('@anthropic-ai/sdk/version');

const SCHEMA = {
  type: 'object',
  properties: { ideas: { type: 'array', items: { type: 'string' } } },
  required: ['ideas'],
};

const usage = (u) => ({
  input_tokens: u.input_tokens,
  output_tokens: u.output_tokens,
  cache_read_input_tokens: u.cache_read_input_tokens,
});

const textOf = (message) =>
  message.content
    .filter((block) => block.type === 'text')
    .map((block) => block.text)
    .join('');

// Runs `call`, expecting an HTTP error; returns what the SDK made of it.
async function rejected(call) {
  try {
    await call();
  } catch (error) {
    if (!(error instanceof Anthropic.APIError) || error.status === undefined) throw error;
    const inner = (error.error && error.error.error) || error.error || {};
    return {
      status: error.status,
      class: error.constructor.name,
      type: inner.type ?? null,
      message: inner.message ?? null,
      request_id: error.requestID ?? (error.headers && error.headers.get('request-id')) ?? null,
    };
  }
  return { status: 200 };
}

async function main() {
  const [baseURL, model] = process.argv.slice(2);
  const client = new Anthropic({ apiKey: 'sk-ant-sdk-test', baseURL, maxRetries: 0 });
  const params = {
    model,
    max_tokens: 64,
    system: 'Be brief.',
    messages: [{ role: 'user', content: "Name three ideas for a bakery's customer quiz." }],
  };
  const out = { sdk_version: sdkVersion };

  // Streaming through the SDK's helper: text deltas, then the accumulated message.
  let streamed = '';
  const stream = client.messages.stream(params);
  stream.on('text', (delta) => {
    streamed += delta;
  });
  const final = await stream.finalMessage();
  out.stream = {
    text: streamed,
    final_text: textOf(final),
    stop_reason: final.stop_reason,
    usage: usage(final.usage),
  };

  // The raw event stream (`stream: true`): every event type the SDK decoded, in order.
  const raw = await client.messages.create({ ...params, stream: true });
  out.raw_event_types = [];
  for await (const event of raw) out.raw_event_types.push(event.type);

  // Not streaming.
  const message = await client.messages.create(params);
  out.create = { text: textOf(message), stop_reason: message.stop_reason, usage: usage(message.usage) };

  // A forced tool, streamed: the SDK assembles the tool input from input_json_delta pieces.
  const toolFinal = await client.messages
    .stream({
      ...params,
      max_tokens: 1024, // room for the whole JSON answer, so the tool input is complete
      tools: [{ name: 'answer', description: 'The answer.', input_schema: SCHEMA }],
      tool_choice: { type: 'tool', name: 'answer' },
    })
    .finalMessage();
  const toolUse = toolFinal.content.find((block) => block.type === 'tool_use');
  out.tool = {
    stop_reason: toolFinal.stop_reason,
    name: toolUse ? toolUse.name : null,
    input: toolUse ? toolUse.input : null,
  };

  // A temperature added by hand (the SDK's types no longer have it) gets the version's 400,
  // streaming or not.
  out.temperature = await rejected(() => client.messages.create({ ...params, temperature: 1.0 }));
  out.temperature_stream = await rejected(async () => {
    const s = await client.messages.create({ ...params, stream: true, temperature: 0.2 });
    for await (const _ of s);
  });
  // Asking for the old version per request brings the parameter back.
  const old = await client.messages.create(
    { ...params, temperature: 0.2 },
    { headers: { 'anthropic-version': '2023-06-01' } },
  );
  out.temperature_2023 = { text: textOf(old), stop_reason: old.stop_reason };

  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : error);
  process.exit(1);
});
