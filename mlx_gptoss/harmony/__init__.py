"""The harmony format (gpt-oss's chat format), one module per idea; `from mlx_gptoss import harmony` gives all of it.

    vocabulary.py  the special token ids and the offline o200k_base.tiktoken openai-harmony reads; encoding()
    tools.py       function tools: Tool, tool_spec() from a Python callable or a dict, tool_specs()
    rendering.py   message dicts -> prompt ids: render(), harmony's history rules, assistant parts
    stream.py      StreamParser: generated ids -> reasoning / preamble / content / tool-call pieces, never raising

openai-harmony (OpenAI's reference library for the format) renders the system, developer, user, tool and
finished assistant messages; these modules adapt it and add what it does not do.
"""

from .rendering import (CHANNELS, CONTENT_TYPE, EFFORTS, KNOWLEDGE_CUTOFF, REASONING_SEPARATOR, RECIPIENT,
                        assistant_dict, assistant_parts, assistant_tool_calls, call_name, call_recipient, part_key,
                        render)
from .stream import MAX_HEADER, MAX_HEADER_TOKENS, Piece, StreamParser
from .tools import Tool, tool_spec, tool_specs
from .vocabulary import (CALL, CHANNEL, CONSTRAIN, END, MESSAGE, N_ORDINARY, RETURN, START, STOP_TOKENS, VOCAB_FILE,
                         VOCAB_SHA256, cache_dir, check_vocabulary, encoding, ensure_vocab,
                         tiktoken_from_tokenizer_json, token_bytes)

__all__ = ["CALL", "CHANNEL", "CHANNELS", "CONSTRAIN", "CONTENT_TYPE", "EFFORTS", "END", "KNOWLEDGE_CUTOFF",
           "MAX_HEADER", "MAX_HEADER_TOKENS", "MESSAGE", "N_ORDINARY", "REASONING_SEPARATOR", "RECIPIENT", "RETURN",
           "START", "STOP_TOKENS", "VOCAB_FILE", "VOCAB_SHA256", "Piece", "StreamParser", "Tool", "assistant_dict",
           "assistant_parts", "assistant_tool_calls", "cache_dir", "call_name", "call_recipient", "check_vocabulary",
           "encoding", "ensure_vocab", "part_key", "render", "tiktoken_from_tokenizer_json", "token_bytes",
           "tool_spec", "tool_specs"]
