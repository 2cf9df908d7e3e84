"""`gptoss-mac chat`: a terminal chat with gpt-oss.

Interactive (a TTY): prompt_toolkit line editing and history, multi-line input (Esc then Enter, or end a
line with a backslash), the reply streamed by render.ReplyView, slash commands, Ctrl-C stops a reply and
keeps the conversation, Ctrl-D or /exit quits. Piped: one prompt per input line, only the final answers
on stdout, no colours. The conversation is autosaved as JSON after every reply and on a crash.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console

from mlx_gptoss import hub
from mlx_gptoss.errors import GptOssError

from . import download as dl
from .render import ReplyView, stats_line

EFFORTS = ("low", "medium", "high")
SAVE_FORMAT = "gptoss-mac chat"
err = Console(stderr=True, highlight=False)


def state_dir() -> Path:
    """Where history and autosaves live: $XDG_STATE_HOME/gptoss-mac, else ~/.local/state/gptoss-mac."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "gptoss-mac"


# --- option checks: one sentence each, exit status 2 (click's usage error) -------------------------------

def _positive(name: str, example: str):
    def check(value):
        if value is not None and value <= 0:
            raise typer.BadParameter(f"must be a positive number of tokens, like {example}; got {value}")
        return value
    return check


def _memory(value: str | None) -> str | None:
    from mlx_gptoss.memory import parse_size

    if value is not None:
        try:
            parse_size(value)
        except GptOssError:
            raise typer.BadParameter(f"not a size: write it like 16GB, 24GiB or 64G; got {value!r}") from None
    return value


def _effort(value: str) -> str:
    if value not in EFFORTS:
        raise typer.BadParameter(f"must be low, medium or high; got {value!r}")
    return value


def _temperature(value: float) -> float:
    if value < 0:
        raise typer.BadParameter(f"must be 0 (greedy) or more; got {value}")
    return value


def _top_p(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1]; got {value}")
    return value


@dataclass
class Settings:
    effort: str = "medium"
    show_reasoning: bool = False
    developer: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int | None = None


@dataclass
class Totals:
    turns: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last: object = None
    history: list = field(default_factory=list)


def chat(
    model: str = typer.Option(hub.DEFAULT_MODEL, "--model", "-m",
                              help="Hugging Face repo id or local folder; a repo is downloaded on first use."),
    effort: str = typer.Option("medium", "--effort", callback=_effort, help="Reasoning effort: low, medium or high."),
    show_reasoning: bool = typer.Option(False, "--show-reasoning", help="Stream the chain-of-thought (dimmed)."),
    temperature: float = typer.Option(1.0, "--temperature", callback=_temperature,
                                      help="Sampling temperature; 0 is greedy. OpenAI recommends 1.0."),
    top_p: float = typer.Option(1.0, "--top-p", callback=_top_p, help="Nucleus sampling threshold."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", callback=_positive("--max-tokens", "2048"),
                                          help="Most tokens per reply (reasoning included)."),
    ctx: int | None = typer.Option(None, "--ctx", callback=_positive("--ctx", "8192"),
                                   help="Context length in tokens (default: what fits in memory)."),
    developer: str | None = typer.Option(None, "--developer", help="Developer instructions (system prompt)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed, for reproducible sampling."),
    memory: str | None = typer.Option(None, "--memory", callback=_memory,
                                      help="Memory budget for the plan, like 16GB (default: this machine's)."),
) -> None:
    """Chat with gpt-oss in the terminal (reads one prompt per line when stdin is not a terminal)."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    settings = Settings(effort, show_reasoning, developer, temperature, top_p, max_tokens, seed)
    gpt = load_model(model, ctx=ctx, memory=memory, interactive=interactive)
    conv = Conversation(gpt, settings)
    Chat(conv, interactive).run()


# --- the model: download on first use, progress bar, memory plan line ----------------------------------

def load_model(model: str, *, ctx: int | None, memory: str | None, interactive: bool):
    import mlx_gptoss

    if not Path(model).expanduser().exists() and not hub.looks_like_path(model) and hub.cached(model) is None:
        plan = hub.plan_download(model)
        if interactive and not typer.confirm(f"{model} is not downloaded yet: fetch {hub.gb(plan.needed)} now?",
                                             default=True, err=True):
            err.print(f"nothing downloaded; `gptoss-mac download {model}` fetches it when you are ready")
            raise typer.Exit(1)
        dl.fetch(plan)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    kwargs = {k: v for k, v in (("ctx", ctx), ("memory", memory)) if v is not None}
    with Progress(TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not interactive) as bar:
        task = bar.add_task(model, total=None)
        gpt = mlx_gptoss.load(model, allow_download=False, progress=lambda done, total: bar.update(
            task, completed=done, total=total), **kwargs)
    line = plan_line(gpt)
    err.print(f"[dim]{line}[/]" if interactive else line, markup=interactive, soft_wrap=not interactive)
    return gpt


def plan_line(gpt) -> str:
    """One line: the memory plan load() applied (weights, KV budget, context)."""
    plan = getattr(gpt, "plan", None)
    if plan is None:
        return f"{gpt.path.name}: {gpt.config.num_hidden_layers} layers, {gpt.config.num_local_experts} experts"
    summary = getattr(plan, "summary", None)
    if summary is not None:
        return summary() if callable(summary) else str(summary)
    from mlx_gptoss.memory import gb

    line = (f"memory plan: weights {gb(plan.weight_bytes)} + KV cache {gb(plan.kv_bytes)} for a context of "
            f"{plan.context:,} tokens = {gb(plan.needed)} of {gb(plan.budget.usable)} ({plan.budget.source})")
    if plan.status == "smaller context":
        line += f"; the context is reduced from {plan.requested_context:,} to fit"
    return line


# --- the engine: the only place that talks to the chat Session ------------------------------------------

class Conversation:
    """The chat Session plus what the CLI adds: settings, JSON save/load."""

    def __init__(self, gpt, settings: Settings):
        self.gpt, self.settings = gpt, settings
        self.session = self._new_session()

    def _new_session(self, messages=None):
        s = self.settings
        return self.gpt.session(reasoning_effort=s.effort, developer=s.developer, messages=messages)

    def send(self, text: str):
        s = self.settings
        return self.session.send(text, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                 seed=s.seed)

    def messages(self) -> list[dict]:
        return [dict(m) for m in self.session.messages]

    def reset(self) -> None:
        self.session = self._new_session()

    def rebuild(self) -> None:
        """After a settings change: same messages, new system/developer prefix."""
        self.session = self._new_session(self.messages())

    def to_json(self) -> dict:
        s = self.settings
        return {"format": SAVE_FORMAT, "version": 1, "model": str(self.gpt.path),
                "settings": {"effort": s.effort, "developer": s.developer},
                "messages": self.messages()}

    def save(self, path: Path) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False))
        tmp.replace(path)  # atomic: a crash mid-write never leaves half a file
        return path

    def load(self, path: Path) -> int:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise GptOssError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GptOssError(f"{path}: not a saved chat ({e})") from None
        if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT or not isinstance(
                data.get("messages"), list):
            raise GptOssError(f"{path}: not a chat saved by /save")
        st = data.get("settings") or {}
        if st.get("effort") in EFFORTS:
            self.settings.effort = st["effort"]
        self.settings.developer = st.get("developer")
        self.session = self._new_session(data["messages"])
        return len(data["messages"])


# --- the loop ------------------------------------------------------------------------------------------

COMMANDS = {
    "/help": "this list",
    "/reset": "start a new conversation",
    "/effort LEVEL": "reasoning effort: low, medium or high",
    "/reasoning on|off": "show or hide the chain-of-thought",
    "/developer TEXT": "set developer instructions (empty: remove them)",
    "/save FILE": "save the conversation as JSON",
    "/load FILE": "load a conversation saved with /save",
    "/stats": "speed and token counts",
    "/exit": "quit (also Ctrl-D)",
}
KEYS = ("Enter sends · Esc then Enter, or a trailing \\, starts a new line · Up/Down: history · "
        "Ctrl-C stops a reply or clears the line · Ctrl-D quits")


class Chat:
    def __init__(self, conv: Conversation, interactive: bool):
        self.conv, self.interactive = conv, interactive
        self.out = Console(highlight=False) if interactive else Console(no_color=True, highlight=False,
                                                                         emoji=False, soft_wrap=True)
        self.totals = Totals()
        self.autosave_path = state_dir() / "autosave.json"

    # -- input
    def _prompt_session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        keys = KeyBindings()

        @keys.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        @keys.add("enter")
        def _enter(event):
            buf = event.current_buffer
            if buf.document.text_before_cursor.endswith("\\"):
                buf.delete_before_cursor(1)
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        try:
            state_dir().mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(state_dir() / "history"))
        except OSError:
            history = InMemoryHistory()
        return PromptSession(history=history, key_bindings=keys, multiline=True,
                             prompt_continuation=lambda width, *_: "." * (width - 1) + " ")

    def lines(self):
        """User inputs; None on Ctrl-C at the prompt (cleared line)."""
        if not self.interactive:
            for line in sys.stdin:
                yield line.rstrip("\n")
            return
        session = self._prompt_session()
        while True:
            try:
                yield session.prompt("› ")
            except KeyboardInterrupt:
                yield None
            except EOFError:
                return

    # -- loop
    def run(self) -> None:
        if self.interactive:
            self.out.print(f"[dim]gpt-oss chat · effort {self.conv.settings.effort} · /help for commands · "
                           "Ctrl-D to quit[/]")
        try:
            for line in self.lines():
                if line is None or not line.strip():
                    continue
                if line.strip().startswith("/"):
                    if self.command(line.strip()) == "exit":
                        break
                    continue
                self.turn(line)
        except Exception as e:  # a crash never loses the conversation
            where = self._save_quietly(state_dir() / f"crash-{time.strftime('%Y%m%d-%H%M%S')}.json")
            err.print(f"[bold red]error:[/] {type(e).__name__}: {e}")
            if where:
                err.print(f"the conversation is saved in {where}; /load it in a new chat to continue")
            raise typer.Exit(1)

    def turn(self, text: str) -> None:
        view = ReplyView(self.out, show_reasoning=self.conv.settings.show_reasoning, plain=not self.interactive)
        stats, t0 = None, time.perf_counter()
        try:
            with view:
                for ev in self.conv.send(text):
                    if ev.kind == "done":
                        stats = getattr(ev, "stats", None)
                    else:
                        view.event(ev)
        except KeyboardInterrupt:
            self.out.print("[dim]stopped; the conversation is kept (the unfinished reply is not).[/]")
            return
        except GptOssError as e:
            err.print(f"[bold red]error:[/] {e}")
            return
        self.totals.turns += 1
        self.totals.seconds += time.perf_counter() - t0
        self.totals.last = stats
        if self.interactive:
            line = stats_line(stats, view.reasoning_tokens)
            if line:
                self.out.print(f"[dim]{line}[/]")
        self._save_quietly(self.autosave_path)

    def _save_quietly(self, path: Path) -> Path | None:
        try:
            return self.conv.save(path)
        except Exception:
            return None

    # -- slash commands
    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.conv.settings
        say = self.out.print
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            for cmd, what in COMMANDS.items():
                say(f"  [bold]{cmd:<18}[/] {what}")
            say(f"[dim]{KEYS}[/]")
        elif name == "/reset":
            self.conv.reset()
            say("new conversation.")
        elif name == "/effort":
            if arg not in EFFORTS:
                say(f"usage: /effort low|medium|high (now {s.effort})")
            else:
                s.effort = arg
                self.conv.rebuild()
                say(f"reasoning effort: {arg}")
        elif name == "/reasoning":
            if arg not in ("on", "off"):
                say(f"usage: /reasoning on|off (now {'on' if s.show_reasoning else 'off'})")
            else:
                s.show_reasoning = arg == "on"
                say(f"chain-of-thought {'shown' if s.show_reasoning else 'hidden'}.")
        elif name == "/developer":
            s.developer = arg or None
            self.conv.rebuild()
            say("developer instructions " + ("set." if arg else "removed."))
        elif name in ("/save", "/load"):
            if not arg:
                say(f"usage: {name} FILE")
            else:
                try:
                    if name == "/save":
                        say(f"saved to {self.conv.save(Path(arg))}")
                    else:
                        say(f"loaded {self.conv.load(Path(arg))} messages from {arg}")
                except (GptOssError, OSError) as e:
                    err.print(f"[bold red]error:[/] {e}")
        elif name == "/stats":
            self.stats()
        else:
            say(f"unknown command {name}; commands: {' '.join(c.split()[0] for c in COMMANDS)}")
        return None

    def stats(self) -> None:
        t = self.totals
        say = self.out.print
        say(f"{t.turns} replies in {t.seconds:.1f} s; {len(self.conv.messages())} messages in the conversation")
        if t.last is not None:
            say(f"last reply: {stats_line(t.last)}")
        s = self.conv.settings
        say(f"effort {s.effort} · temperature {s.temperature} · top-p {s.top_p} · "
            f"max tokens {s.max_tokens or 'auto'} · seed {s.seed if s.seed is not None else 'random'}")
