"""Drives the simulator with the official `anthropic` Python SDK, as a new user would: no extra
headers, the SDK's own defaults (its API version, its way of sending the key).

Usage: python anthropic_sdk.py BASE_URL MODEL
BASE_URL is the server root without /v1 (the SDK adds /v1/messages). Prints one JSON object
with what each call returned; the Rust test (engine/sim/tests/it/sdk.rs) checks it.
"""

import json
import sys

import anthropic

PROMPT = "Name three ideas for a bakery's customer quiz."
SCHEMA = {
    "type": "object",
    "properties": {"ideas": {"type": "array", "items": {"type": "string"}}},
    "required": ["ideas"],
}


def usage(u):
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
    }


def text_of(message):
    return "".join(block.text for block in message.content if block.type == "text")


def rejected(call):
    """Runs `call`, expecting an HTTP error; returns what the SDK made of it."""
    try:
        call()
    except anthropic.APIStatusError as error:
        body = error.body if isinstance(error.body, dict) else {}
        inner = body.get("error", body) if isinstance(body, dict) else {}
        return {
            "status": error.status_code,
            "class": type(error).__name__,
            "type": inner.get("type"),
            "message": inner.get("message"),
            "request_id": error.response.headers.get("request-id"),
        }
    return {"status": 200}


def main():
    base_url, model = sys.argv[1], sys.argv[2]
    client = anthropic.Anthropic(api_key="sk-ant-sdk-test", base_url=base_url, max_retries=0)
    params = {
        "model": model,
        "max_tokens": 64,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": PROMPT}],
    }
    out = {"sdk_version": anthropic.__version__}

    # Streaming through the SDK's helper: text deltas, then the accumulated message.
    with client.messages.stream(**params) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    out["stream"] = {
        "text": streamed,
        "final_text": text_of(final),
        "stop_reason": final.stop_reason,
        "usage": usage(final.usage),
    }

    # The raw event stream (`stream=True`): every event type the SDK decoded, in order.
    out["raw_event_types"] = [event.type for event in client.messages.create(**params, stream=True)]

    # Not streaming.
    message = client.messages.create(**params)
    out["create"] = {
        "text": text_of(message),
        "stop_reason": message.stop_reason,
        "usage": usage(message.usage),
    }

    # A forced tool, streamed: the SDK assembles the tool input from input_json_delta pieces.
    # Room for the whole JSON answer, so the tool input is complete.
    with client.messages.stream(
        **{**params, "max_tokens": 1024},
        tools=[{"name": "answer", "description": "The answer.", "input_schema": SCHEMA}],
        tool_choice={"type": "tool", "name": "answer"},
    ) as stream:
        tool_final = stream.get_final_message()
    tool_uses = [block for block in tool_final.content if block.type == "tool_use"]
    out["tool"] = {
        "stop_reason": tool_final.stop_reason,
        "name": tool_uses[0].name if tool_uses else None,
        "input": tool_uses[0].input if tool_uses else None,
    }

    # The SDK has no temperature argument any more; a caller who adds one by hand gets the
    # version's 400, streaming or not.
    out["temperature"] = rejected(
        lambda: client.messages.create(**params, extra_body={"temperature": 1.0})
    )
    out["temperature_stream"] = rejected(
        lambda: client.messages.create(**params, stream=True, extra_body={"temperature": 0.2})
    )
    # Asking for the old version per request brings the parameter back.
    old = client.messages.create(
        **params,
        extra_body={"temperature": 0.2},
        extra_headers={"anthropic-version": "2023-06-01"},
    )
    out["temperature_2023"] = {"text": text_of(old), "stop_reason": old.stop_reason}

    print(json.dumps(out))


if __name__ == "__main__":
    main()
