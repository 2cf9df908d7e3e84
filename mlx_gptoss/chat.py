"""Harmony chat on a loaded model: the generation loop, its events, and the multi-turn Session.

Messages are plain JSON-able dicts (what `Session.messages`, `save()` and `GptOss.chat()` use):

    {"role": "user", "content": "What is the weather in Paris?"}
    {"role": "developer", "content": "Answer in French."}          # instructions, usually via developer=
    {"role": "assistant", "content": "final answer", "reasoning": "chain-of-thought (optional)"}
    {"role": "assistant", "reasoning": "...", "tool_calls": [{"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]}
    {"role": "tool", "name": "get_weather", "content": "{\"temp_c\": 21}"}

Rendering follows harmony (mlx_gptoss.harmony): earlier chain-of-thought is dropped once a final answer
follows it, kept around tool calls; `<|return|>` is stored as `<|end|>`.

Events (`Event`, yielded by `GptOss.chat()` and `Session.send()`), `.kind` is one of:
    "reasoning"  .text: a piece of chain-of-thought (analysis channel; hide it from end users by default)
    "content"    .text: a piece of the answer (final channel; also malformed output, see stats.malformed)
    "tool_call"  .recipient ("functions.get_weather"), .name ("get_weather"), .arguments (the JSON string,
                 exactly as generated; may be invalid JSON), .text == .arguments
    "done"       .stats: a `Stats` (always the last event, also after a cancel or an error in the output)

`Stats` fields: prompt_tokens (the whole rendered prompt), prefilled_tokens (what this turn actually ran
through the model; the rest came from the session's prompt cache), cached_tokens, generated_tokens,
time_to_first_token (s), prefill_tps, decode_tps, peak_memory (bytes, mx.get_peak_memory), stop_reason
("return" | "call" | "max_tokens" | "context" | "cancelled"), malformed (True when the model's output did not
follow harmony; it was then shown as content), warnings (list of str), dropped_messages (how many of the
oldest messages a Session removed to fit the context; 0 normally).

Session (`gpt.session(reasoning_effort="medium", developer=None, tools=None, messages=None, max_context=None,
drop_oldest=True)`), keeps the KV cache between turns so turn N prefills only what is new:
    send(text, *, max_tokens=None, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None,
         tools=None, auto_tools=False, keep_partial=False) -> iterator of Events
        Appends the user message, streams the reply, and appends the assistant message when the reply
        is complete. text=None continues the conversation as it is (e.g. after add_tool_result()).
        auto_tools=True runs Python tool functions itself: each call is yielded as a "tool_call" event,
        then run, its result appended as a tool message and generation continues until a final answer;
        several "done" events can then occur (one per model call); the last one ends the reply.
    add_tool_result(name, content): append a tool message answering a "tool_call" (then send(None)).
    messages: list of message dicts (a copy is safe to json.dumps).
    reset(): forget messages and cache (keeps settings).
    set_effort("low"|"medium"|"high"), set_developer(text | None), set_tools(tools): change the system/
        developer prefix; the cache is kept where it still matches (the next turn re-prefills the rest).
    to_dict() -> JSON-able dict (settings + messages); Session.from_dict(gpt, d) / gpt.session(**d).
    last_stats: the Stats of the last finished model call; dropped: total messages dropped for context.
    cancel(): ask a running send() (e.g. from another thread) to stop after the current token; it then
        yields "done" with stop_reason "cancelled".
    Interruption (Ctrl-C inside the loop, or closing the generator, or cancel()): the session stays
    consistent. The user message is kept; the unfinished reply is DROPPED unless send(keep_partial=True),
    which keeps the final-channel text produced so far as the assistant's answer. The KV cache is
    restored from the snapshot taken at the end of the prompt, so the next turn is still incremental.

Context: a prompt longer than the context cap (max_context, default min(config max_position_embeddings,
the memory plan's context)) raises GptOssError from GptOss.chat(); a Session with drop_oldest=True drops
the oldest user turns instead and reports it in stats.dropped_messages (never silently).

Tools: a Python callable (JSON schema from its signature, type hints and docstring) or a dict
{"name", "description", "parameters": JSON schema}. See mlx_gptoss.harmony.tool_spec().
"""
