"""Make a challenge train_gpt.py hybrid-capable: inline hymba_layer.py into it and hook it in.

    python tools/patch_host.py path/to/train_gpt.py              # patch in place, print what changed
    python tools/patch_host.py path/to/train_gpt.py --out hy.py  # write the patched script elsewhere
    python tools/patch_host.py path/to/train_gpt.py --check      # exit 0 if patched with this hymba_layer.py

Then `HYMBA_LAYERS=0 torchrun --standalone --nproc_per_node=8 train_gpt.py`; without HYMBA_LAYERS every hook
passes straight through and the patched script trains exactly as the original. What is added (hymba_layer.py's
host contract):
  1. hymba_layer.py itself, inlined as code between two marker lines, then `hymba_layer = <this script's module>`
     (so the hooks' hymba_layer.NAME are the inlined definitions): right after the last top-level import (or
     stand-in definition) of the attention kernels the hooks name, and before the first top-level statement that
     runs the model (one naming GPT or main). A name both define at the top level (other than by the same import,
     e.g. `import torch.nn.functional as F`) is refused, naming it: inlined, one definition would replace the other;
  2. every call of an attention kernel inside a function, `KERNEL(q, k, v, ...)`, becomes
     `hymba_layer.hymba_attention(LAYER, KERNEL, q, k, v, ...)` (same arguments, same order). KERNEL is
     F.scaled_dot_product_attention (batch, heads, T, head_dim), flash_attn_3_func / flash_attn_func (FA3,
     batch, T, heads, head_dim) or flash_attn_varlen_func (FA3 on packed documents, cu_seqlens_q/k). LAYER is
     the attention module whose heads these are: `self` in a method of the class the blocks hold as
     `.attn = CausalSelfAttention(...)`, else the function's local `name = ....attn` (record scripts compute
     attention inline on their test-time-training paths). hymba_attention returns KERNEL(q, k, v, ...) for a
     layer that is not hybrid; a hybrid layer gives its attention heads to KERNEL and its SSM heads to the scan;
  3. right after every statement that builds the model, `name = GPT(...)...` (the training model, and the one
     deserialize() loads the artifact into): `hymba_layer.build_and_swap_hymba_layers(name)`.
The module is inlined, not imported, so the one file the challenge counts ("all code in train_gpt.py") holds
every byte that runs, and its `Code size` line is honest; as code (not a string), a host's own minifier (the
record's pyminify in _compressed_code_size) shrinks it like the rest of the script. A self-extracting script
(imports, then one `exec(lzma.decompress(base64.b85decode("...")))`; lzma raw or xz, or brotli; base85 or base64)
holds code minified already: it is unpacked, patched with the module minified the way the record measures code
(python-minifier, names kept, docstrings dropped; where it is not installed, docstrings and comments dropped) and
packed again the same way (--check compares with what this machine writes). Patching is idempotent (a patched
script is updated to the current hymba_layer.py), reversible (unpatch() gives the original back byte for byte, the
marker lines delimiting the module) and atomic. A script the hooks
cannot be made right for (no known kernel in the attention's forward, a kernel call with no layer in scope, a
masked, windowed or non-causal call, a kernel imported only after the model runs, ...) is refused with one line and left
byte for byte as it was.
"""
from __future__ import annotations

import argparse
import ast
import base64
import builtins
import difflib
import importlib
import importlib.metadata
import itertools
import lzma
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from make_dataset import write_atomic

MODULE = Path(__file__).resolve().parents[1] / "hymba_layer.py"
BEGIN = "# ---- hymba_layer.py inlined by tools/patch_host.py (hybrid attention + SSM layers: HYMBA_LAYERS); re-run it to update ----"
END = "# ---- end of hymba_layer.py ----"
NAMESPACE = "hymba_layer = __import__('sys').modules[__name__]  # the hooks' hymba_layer.NAME: the definitions above"
SWAP = "hymba_layer.build_and_swap_hymba_layers({})"
SWAP_ANY = re.escape(SWAP).replace(r"\{\}", r"\w+")
HOOK = "hymba_layer.hymba_attention"
KERNELS = {  # an attention kernel as the host calls it -> its keyword for causal masking
    "F.scaled_dot_product_attention": "is_causal",  # (batch, heads, T, head_dim)
    "torch.nn.functional.scaled_dot_product_attention": "is_causal",
    "flash_attn_3_func": "causal",  # FA3: (batch, T, heads, head_dim)
    "flash_attn_func": "causal",
    "flash_attn_varlen_func": "causal",  # FA3 on packed documents: (tokens, heads, head_dim), cu_seqlens_q/k
}
VARLEN = "flash_attn_varlen_func"
DEFAULT_ONLY = {"attn_mask": None, "window_size": (-1, -1)}  # the SSM heads have no mask and no window
# a rewritten `KERNEL(`: `HOOK(LAYER, KERNEL, ` (no space before a line break)
HOOKED = re.compile(rf"{re.escape(HOOK)}\(\w+, ({'|'.join(map(re.escape, KERNELS))}),(?: |(?=\n))")
RUNS_MODEL = {"GPT", "main"}  # a top-level statement naming one of these runs the model: the module must be in before
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class PatchError(ValueError):
    pass


# ---- reading a host: syntax tree and positions ----

def parse(source: str) -> ast.Module:
    """The script's syntax tree. A top-level definition this Python cannot parse (PR #1493's 3.12 f-strings under
    3.11) is read as blank lines, so every position stays the script's; it must hold nothing the patch rewrites."""
    lines = source.split("\n")
    while True:
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as e:
            at = min(max((e.lineno or 1) - 1, 0), len(lines) - 1)
            top = [i for i, line in enumerate(lines) if line[:1] not in ("", " ", "\t", "#")]  # column-0 code
            start = max((i for i in top if i <= at), default=0)
            while start > 0 and lines[start - 1].startswith("@"):
                start -= 1
            end = min((i for i in top if i > at), default=len(lines))
            chunk = "\n".join(lines[start:end])
            rewritten = re.search(r"\bGPT\(|" + "|".join(re.escape(k) + r"\(" for k in KERNELS), chunk)
            if not chunk.strip() or not re.match(r"(@|def |async def |class )", lines[start]) or rewritten:
                raise PatchError(f"line {e.lineno}: Python {sys.version_info.major}.{sys.version_info.minor} cannot parse it"
                                 f" ({e.msg}); run this tool with the Python the script is written for") from None
            lines[start:end] = [""] * (end - start)


def walk(tree: ast.AST):
    """Every node, with the classes and functions around it (outermost first) and the statement it is part of."""
    stack = [(tree, (), None)]
    while stack:
        node, scopes, statement = stack.pop()
        yield node, scopes, statement
        inner = scopes + (node,) if isinstance(node, DEFINITIONS) else scopes
        stack.extend((child, inner, child if isinstance(child, ast.stmt) else statement) for child in ast.iter_child_nodes(node))


def dotted(node: ast.AST) -> str | None:
    """`F.scaled_dot_product_attention` for that attribute chain of names, None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return base and f"{base}.{node.attr}"
    return None


class Positions:
    """Character offsets in a source of the syntax tree's (line, UTF-8 byte column) positions."""

    def __init__(self, source: str):
        self.lines = source.split("\n")
        self.starts = list(itertools.accumulate((len(line) + 1 for line in self.lines), initial=0))

    def __call__(self, line: int, col: int) -> int:
        text = self.lines[line - 1]
        return self.starts[line - 1] + (col if text.isascii() else len(text.encode()[:col].decode("utf-8", "ignore")))

    def start(self, node: ast.AST) -> int:
        return self(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self(node.end_lineno, node.end_col_offset)


# ---- the three additions, as edits (start, end, new text) of the unpatched source ----

def attention_classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    """The classes blocks hold as `.attn = Cls(...)`, checked against the module's contract."""
    names = {node.value.func.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
             and isinstance(node.value.func, ast.Name) and any(isinstance(t, ast.Attribute) and t.attr == "attn" for t in node.targets)}
    if not names:
        raise PatchError("found no blocks holding the attention as `.attn = CausalSelfAttention(...)`")
    classes = {}
    for name in sorted(names):
        cls = next((s for s in tree.body if isinstance(s, ast.ClassDef) and s.name == name), None)
        if cls is None:  # its attributes (num_heads, num_kv_heads, head_dim) are checked when the swap runs
            raise PatchError(f"found no top-level `class {name}` (blocks hold it as `.attn = {name}(...)`)")
        classes[name] = cls
    return classes


def literal(node: ast.AST | None):
    """The value of a literal argument (lists read as tuples), or a marker that it is not one."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return ...
    return tuple(value) if isinstance(value, list) else value


def check_kernel_call(call: ast.Call, kernel: str, where: str) -> None:
    """Refuse what the SSM heads cannot honour: they are causal, unmasked, unwindowed, one cu_seqlens for q and k."""
    def refuse(problem):
        raise PatchError(f"{where}: {kernel}(...) {problem}; {HOOK} splits the heads of causal attention only"
                         " (no mask, no window, one cu_seqlens for queries and keys)")
    if len(call.args) != 3 or any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        refuse("does not pass exactly q, k, v by position and the rest by keyword")
    keywords = {k.arg: k.value for k in call.keywords}
    causal = KERNELS[kernel]
    if literal(keywords.get(causal)) is not True:
        refuse(f"is not causal (it needs `{causal}=True`)")
    for name, default in DEFAULT_ONLY.items():
        if name in keywords and literal(keywords[name]) != default:
            refuse(f"sets `{name}={ast.unparse(keywords[name])}`")
    if kernel == VARLEN:
        q, k = keywords.get("cu_seqlens_q"), keywords.get("cu_seqlens_k")
        if q is None or k is None or ast.dump(q) != ast.dump(k):
            shown = " and ".join(f"cu_seqlens_{s}={ast.unparse(v) if v else '(missing)'}" for s, v in (("q", q), ("k", k)))
            refuse(f"needs the same cu_seqlens_q= and cu_seqlens_k= keywords, and has {shown}")


def attention_local(function: ast.AST, line: int) -> str | None:
    """The local name assigned `... .attn` last before `line` in `function` (`attn = block.attn`)."""
    found = [(node.lineno, node.targets[0].id) for node in ast.walk(function)
             if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
             and isinstance(node.value, ast.Attribute) and node.value.attr == "attn" and node.lineno < line]
    return max(found)[1] if found else None


def kernel_hooks(source: str, nodes: list, at: Positions, classes: dict) -> tuple[list, set[str]]:
    """Edits routing every kernel call inside a function through hymba_attention, and the kernels called."""
    calls = sorted(((node, scopes) for node, scopes, _ in nodes if isinstance(node, ast.Call) and dotted(node.func) in KERNELS),
                   key=lambda c: (c[0].lineno, c[0].col_offset))
    edits, used, in_forward = [], set(), set()
    for call, scopes in calls:
        kernel, functions = dotted(call.func), [s for s in scopes if not isinstance(s, ast.ClassDef)]
        if not functions or functions[-1].name in KERNELS:
            continue  # at module level, or inside a stand-in defining the kernel itself: no attention layer's call
        function = functions[-1]
        where = f"line {call.lineno}, in {'.'.join(s.name for s in scopes)}"
        check_kernel_call(call, kernel, where)
        owner = scopes[scopes.index(function) - 1] if scopes.index(function) else None
        params = function.args.posonlyargs + function.args.args
        if isinstance(owner, ast.ClassDef) and owner.name in classes and params:
            layer = params[0].arg  # self
            if function.name == "forward":
                in_forward.add(owner.name)
        else:
            layer = attention_local(function, call.lineno)
            if layer is None:
                raise PatchError(f"{where}: {kernel}(...) has no attention layer in scope: expected a method of "
                                 f"{' or '.join(classes)}, or a local `name = ....attn` before the call")
        start, paren = at.start(call), at.end(call.func)
        if source[start:paren + 1] != kernel + "(":
            raise PatchError(f"{where}: write the call as `{kernel}(...)`, with nothing inside `{kernel}(`, so the hook can be undone exactly")
        space = "" if source[paren + 1:paren + 2] == "\n" else " "
        edits.append((start, paren + 1, f"{HOOK}({layer}, {kernel},{space}"))
        used.add(kernel)
    for name in classes:
        if name not in in_forward:
            raise PatchError(f"no attention kernel found in {name}.forward: expected one of {', '.join(KERNELS)}")
    return edits, used


def model_hooks(source: str, nodes: list, at: Positions) -> list:
    """Edits adding the swap right after every `name = GPT(...)...` statement."""
    edits = []
    for node, _, statement in nodes:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "GPT"):
            continue
        target = statement.targets[0] if isinstance(statement, ast.Assign) and len(statement.targets) == 1 else getattr(statement, "target", None)
        root = getattr(statement, "value", None)
        while isinstance(root, ast.Call) and isinstance(root.func, ast.Attribute):
            root = root.func.value  # GPT(h).to(device).bfloat16() -> GPT(h)
        if not isinstance(target, ast.Name) or root is not node:
            raise PatchError(f"line {node.lineno}: the model built there is not `name = GPT(...)...`"
                             f" (`{at.lines[node.lineno - 1].strip()}`): assign it to a name so the swap can follow")
        swap, end = SWAP.format(target.id), at.end(statement)
        line_start, line_end = at(statement.lineno, 0), source.find("\n", end)
        rest = source[end:line_end].strip()
        if source[line_start:at.start(statement)].strip() or line_end < 0 or (rest and not rest.startswith("#")):
            edits.append((end, end, ";" + swap))  # not alone on its line: the next statement on it
        else:
            indent = source[line_start:at.start(statement)]
            edits.append((line_end + 1, line_end + 1, f"{indent}{swap}  # hymba: swap in hybrid layers (no-op without HYMBA_LAYERS)\n"))
    if not edits:
        raise PatchError("found no model built as `name = GPT(...)` at the start of a statement")
    return edits


def bound_names(statement: ast.stmt) -> set[str]:
    """The names a top-level statement defines (imports, assignments, defs and classes)."""
    if isinstance(statement, DEFINITIONS):
        return {statement.name}
    names = set()
    for node in ast.walk(statement):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, DEFINITIONS):
            names.add(node.name)
    return names


def module_position(tree: ast.Module, at: Positions, kernels: set[str]) -> int:
    """Where the inlined module goes: after the top-level imports of the kernels the hooks name, before the model runs."""
    last = {name: i for i, statement in enumerate(tree.body) for name in bound_names(statement)}
    needed = sorted({kernel.split(".")[0] for kernel in kernels})
    for name in needed:
        if name not in last:
            raise PatchError(f"`{name}` (of the attention kernel) is not imported or defined at the top level")
    after, name = max((last[name], name) for name in needed)
    runs = next((i for i, s in enumerate(tree.body) if not isinstance(s, DEFINITIONS + (ast.Import, ast.ImportFrom))
                 and any(isinstance(n, ast.Name) and n.id in RUNS_MODEL for n in ast.walk(s))), len(tree.body))
    if after >= runs:
        raise PatchError(f"`{name}` is defined at line {tree.body[after].lineno}, after line {tree.body[runs].lineno} already"
                         f" runs the model (`{at.lines[tree.body[runs].lineno - 1].strip()}`); the inlined module needs it before")
    end_line = tree.body[after].end_lineno
    return at(end_line + 1, 0) if end_line < len(at.lines) else at.starts[-1] - 1


def top_level_names(tree: ast.Module) -> dict[str, list[tuple]]:
    """name -> how the script's top level binds it: ("import", what, line) per import of it, ("code", line) per
    anything else (assignment, definition, loop, `with`, `except ... as`, `global` in a function, ...)."""
    names = defaultdict(list)
    scopes = DEFINITIONS + (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for a in child.names:
                    head = a.name.split(".")[0]
                    names[a.asname or head].append(("import", a.name if a.asname else head, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                for a in child.names:
                    if a.name == "*":
                        raise PatchError(f"line {child.lineno}: `from {child.module} import *` binds names that cannot"
                                         " be checked against hymba_layer.py's; import the names it uses")
                    what = f"{'.' * child.level}{child.module or ''}.{a.name}"
                    names[a.asname or a.name].append(("import", what, child.lineno))
            elif isinstance(child, scopes):  # its body is another scope
                if isinstance(child, DEFINITIONS):
                    names[child.name].append(("code", child.lineno))
            else:
                bound = (child.id if isinstance(child, ast.Name) and not isinstance(child.ctx, ast.Load)
                         else getattr(child, "name", None) or getattr(child, "rest", None))  # except/match ... as name
                if isinstance(bound, str):
                    names[bound].append(("code", child.lineno))
                visit(child)
    visit(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            for name in node.names:
                names[name].append(("code", node.lineno))
    return names


def check_names(host: ast.Module, module: ast.Module) -> None:
    """Refuse a script whose top level binds a name the module binds too, unless both import the same thing."""
    ours, theirs = top_level_names(module), top_level_names(host)
    shadowed = sorted(set(ours) & set(dir(builtins)))
    if shadowed:
        raise PatchError(f"{MODULE.name} defines the builtin name(s) {', '.join(shadowed)} at its top level; inlined,"
                         " they would change the script's meaning")
    key = lambda binding: binding[:-1]  # without the line
    clashes = [name for name in sorted(set(ours) & set(theirs))
               if len({key(b) for b in ours[name] + theirs[name]}) > 1 or ours[name][0][0] != "import"]
    if clashes:
        shown = ", ".join(f"`{name}` (line {theirs[name][0][-1]})" for name in clashes)
        raise PatchError(f"it defines {shown} at its top level, as hymba_layer.py does; inlined as code, one definition"
                         " would replace the other: rename the script's")


def strip_literals(tree: ast.Module) -> ast.Module:
    """The tree without statements that are only a literal (docstrings), as pyminify --remove-literal-statements."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and all(isinstance(s, ast.stmt) for s in body):
            kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            node.body = kept or [ast.Pass()]
    return tree


def module_code(module_source: str, minify: bool = False) -> str:
    """hymba_layer.py's code as the patch inlines it: as written, or minified for a self-extracting script's payload
    the way the record's _compressed_code_size measures code (python-minifier: names kept, docstrings dropped), or
    where python-minifier is not installed, without docstrings and comments (ast)."""
    tree = parse(module_source)
    future = next((s for s in tree.body if isinstance(s, ast.ImportFrom) and s.module == "__future__"), None)
    if future is not None:
        raise PatchError(f"{MODULE.name} line {future.lineno}: `from __future__ import ...` cannot be inlined"
                         " mid-script; remove it (the module must run without it)")
    if minify:
        try:
            import python_minifier
        except ImportError:
            module_source = ast.unparse(strip_literals(tree))
        else:
            module_source = python_minifier.minify(module_source, rename_locals=False, hoist_literals=False,
                                                   remove_literal_statements=True)
    return module_source if module_source.endswith("\n") else module_source + "\n"


def minifier() -> str:
    """What minifies the module inlined into a self-extracting script, as the tool reports it."""
    try:
        import python_minifier  # noqa: F401
    except ImportError:
        return "docstrings and comments dropped (pip install python-minifier for its smaller code)"
    return f"python-minifier {importlib.metadata.version('python-minifier')}"


def inline_block(module_source: str, minify: bool = False) -> str:
    """The module's code between the marker lines, then the hooks' `hymba_layer`: this script's own module."""
    namespace = NAMESPACE.split("  #")[0].replace(" = ", "=") if minify else NAMESPACE
    return f"{BEGIN}\n{module_code(module_source, minify)}{namespace}\n{END}\n"


def unpatch(src: str) -> str:
    """The script without our block and hooks, byte for byte as before patching (so patching again replaces them)."""
    if BEGIN not in src:
        return src  # never patched: any hymba_layer text in it was written by hand
    start = src.index(BEGIN)
    end = src.find(END, start)
    if end < 0:
        raise PatchError(f"it has the line `{BEGIN[:40]}...` but not `{END}`; restore the script from its original")
    src = src[:start] + src[end + len(END) + 1:]
    src = re.sub(rf"\n[ \t]*{SWAP_ANY}[^\n]*(?=\n)|;{SWAP_ANY}", "", src)
    return HOOKED.sub(r"\1(", src)


def patch_source(src: str, module_source: str, minify: bool = False) -> str:
    """The plain (unwrapped) script with the module inlined (minified: for a self-extracting script), hooks added."""
    src = unpatch(src)
    if "hymba_layer" in src:
        raise PatchError("it already mentions hymba_layer outside a block this tool wrote (hooks added by hand?); remove them first")
    tree, at = parse(src), Positions(src)
    check_names(tree, parse(module_source))
    nodes = list(walk(tree))
    classes = attention_classes(tree)
    kernel_edits, kernels = kernel_hooks(src, nodes, at, classes)
    edits = kernel_edits + model_hooks(src, nodes, at)
    at_module = module_position(tree, at, kernels)
    edits.append((at_module, at_module, inline_block(module_source, minify)))
    for start, end, text in sorted(edits, key=lambda e: e[0], reverse=True):  # from the end: offsets stay valid
        src = src[:start] + text + src[end:]
    return src


# ---- self-extracting scripts ----

CODECS = {"base64.b85decode": (base64.b85decode, base64.b85encode), "base64.b64decode": (base64.b64decode, base64.b64encode)}
COMPRESSORS = ("lzma", "brotli")  # <name>.decompress
STRONGEST = 9 | lzma.PRESET_EXTREME


@dataclass
class Wrapper:
    """How a self-extracting script packs its code: `exec(<compressor>.decompress(<decoder>("..."), **options))`."""
    decoder: str  # a CODECS key
    compressor: str  # a COMPRESSORS name
    options: dict  # the decompress call's keywords (lzma: format, filters)
    start: int  # the payload literal's span in the script
    end: int

    def module(self):
        try:
            return importlib.import_module(self.compressor)
        except ImportError:
            raise PatchError(f"the script unpacks itself with {self.compressor}, which is not installed here") from None

    def unpack(self, text: str) -> str:
        data = CODECS[self.decoder][0](ast.literal_eval(text[self.start:self.end]))
        try:
            return self.module().decompress(data, **self.options).decode("utf-8")
        except Exception as e:  # lzma.LZMAError, brotli.error, UnicodeDecodeError
            raise PatchError(f"it looks self-extracting but its payload does not unpack with "
                             f"{self.compressor}.decompress({self.decoder}(...)) ({e})") from None

    def pack(self, text: str, source: str) -> str:
        """`text` with its payload replaced by `source`, packed the same way (the strongest preset)."""
        data = source.encode("utf-8")
        if self.compressor == "brotli":
            packed = self.module().compress(data, quality=11)
        else:  # the same lzma format and filter chain
            options = {k: v for k, v in self.options.items() if k != "memlimit"}
            if options.get("format", lzma.FORMAT_AUTO) == lzma.FORMAT_AUTO:
                options["format"] = lzma.FORMAT_XZ
            if "filters" in options:
                options["filters"] = [{**f, "preset": STRONGEST} if set(f) == {"id"} and f["id"] in (lzma.FILTER_LZMA1, lzma.FILTER_LZMA2)
                                      else f for f in options["filters"]]
            else:
                options["preset"] = STRONGEST
            packed = lzma.compress(data, **options)
        old = text[self.start:self.end]
        prefix, quote = re.match(r"([a-zA-Z]*)('''|\"\"\"|'|\")", old).groups()
        payload = CODECS[self.decoder][1](packed).decode("ascii")  # base85/base64: no quotes, no backslashes
        return text[:self.start] + prefix + quote + payload + quote + text[self.end:]


def constant(node: ast.AST, aliases: dict[str, str]):
    """A decompress keyword's value: literals, `|`, and lzma's constants (`L.FORMAT_RAW`)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [constant(e, aliases) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {constant(k, aliases): constant(v, aliases) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return constant(node.left, aliases) | constant(node.right, aliases)
    name = qualified(node, aliases) or ""
    if re.fullmatch(r"lzma\.[A-Z0-9_]+", name) and hasattr(lzma, name[5:]):
        return getattr(lzma, name[5:])
    raise PatchError(f"its decompress call has an argument this tool cannot read: `{ast.unparse(node)}`")


def qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`lzma.decompress` for `L.decompress` after `import lzma as L`."""
    name = dotted(node)
    if name is None:
        return None
    head, _, rest = name.partition(".")
    head = aliases.get(head, head)
    return f"{head}.{rest}" if rest else head


def find_wrapper(text: str) -> Wrapper | None:
    """The wrapper of a self-extracting script: top-level imports and one exec(...) only; None for any other script."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    imports = [s for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))]
    rest = [s for s in tree.body if not isinstance(s, (ast.Import, ast.ImportFrom))]
    if not (imports and len(rest) == 1 and isinstance(rest[0], ast.Expr) and isinstance(rest[0].value, ast.Call)
            and dotted(rest[0].value.func) == "exec" and rest[0].value.args):
        return None
    aliases = {}
    for s in imports:
        for a in s.names:
            if isinstance(s, ast.Import):
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif s.module and not s.level:
                aliases[a.asname or a.name] = f"{s.module}.{a.name}"
    run = rest[0].value.args[0]
    if isinstance(run, ast.Call) and isinstance(run.func, ast.Attribute) and run.func.attr == "decode":
        run = run.func.value  # exec(....decode())
    decode = run.args[0] if isinstance(run, ast.Call) and len(run.args) == 1 else None
    payload = decode.args[0] if isinstance(decode, ast.Call) and len(decode.args) == 1 and not decode.keywords else None
    if not (isinstance(payload, ast.Constant) and isinstance(payload.value, (str, bytes))):
        raise PatchError(f"it is self-extracting but runs `exec({ast.unparse(run)[:60]})`, not "
                         f"exec(<compressor>.decompress(<decoder>(\"...\")))")
    decompressor, decoder = qualified(run.func, aliases), qualified(decode.func, aliases)
    if decompressor not in [f"{c}.decompress" for c in COMPRESSORS] or decoder not in CODECS:
        raise PatchError(f"it is self-extracting, packed as {decompressor}({decoder}(...)); this tool unpacks "
                         f"{' or '.join(f'{c}.decompress' for c in COMPRESSORS)} of {' or '.join(CODECS)}")
    at = Positions(text)
    options = {k.arg: constant(k.value, aliases) for k in run.keywords}
    return Wrapper(decoder, decompressor.split(".")[0], options, at.start(payload), at.end(payload))


def unwrap(text: str) -> tuple[str, Wrapper | None]:
    """(source, wrapper) for a self-extracting script, (text, None) for a plain one."""
    wrapper = find_wrapper(text)
    return (text, None) if wrapper is None else (wrapper.unpack(text), wrapper)


def wrap(text: str, wrapper: Wrapper, source: str) -> str:
    """The self-extracting `text` running `source` instead, packed the way it was."""
    return wrapper.pack(text, source)


def patch_text(text: str, module_source: str) -> str:
    source, wrapper = unwrap(text)
    patched = patch_source(source, module_source, minify=wrapper is not None)
    if wrapper is None:
        return patched
    if patched == source:
        return text  # already current: keep the bytes (packing again could differ)
    return wrap(text, wrapper, patched)


# ---- command line ----

def summary_diff(before: str, after: str, name: str) -> str:
    """A unified diff of the hooks, with the inlined module shown as one line."""
    def shown(s: str) -> list[str]:
        s = unwrap(s)[0]
        if BEGIN in s:
            start, end = s.index(BEGIN), s.index(END) + len(END)
            s = s[:start] + f"{BEGIN}\n<hymba_layer.py: {end - start:,} characters>\n{END}" + s[end:]
        return s.splitlines(keepends=True)
    return "".join(difflib.unified_diff(shown(before), shown(after), f"{name} (before)", f"{name} (patched)", n=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", type=Path, help="the host train_gpt.py (plain or self-extracting)")
    p.add_argument("--out", type=Path, help="write the patched script here instead of in place")
    p.add_argument("--check", action="store_true", help="change nothing; exit 0 if the script is patched with the current module, 1 if not")
    args = p.parse_args(argv)
    try:
        if not args.script.is_file():
            raise PatchError("no such file")
        text = args.script.read_text(encoding="utf-8")
        patched = patch_text(text, MODULE.read_text(encoding="utf-8"))
    except (PatchError, UnicodeDecodeError) as e:
        print(f"patch_host.py: {args.script}: cannot patch: {e}; the file is unchanged", file=sys.stderr)
        return 2
    current = patched == text
    if args.check:
        print(f"{args.script}: {'patched with the current hymba_layer.py' if current else 'not patched, or with another hymba_layer.py'}")
        return 0 if current else 1
    out = args.out or args.script
    if current and out == args.script:
        print(f"{args.script}: already patched with the current hymba_layer.py; nothing to do")
        return 0
    print(summary_diff(text, patched, args.script.name), end="")
    write_atomic(out, patched.encode("utf-8"))
    form = f"self-extracting, hymba_layer.py minified: {minifier()}" if find_wrapper(text) is not None else "plain"
    print(f"wrote {out} ({form}): {len(text.encode()):,} -> {len(patched.encode()):,} bytes of counted code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
