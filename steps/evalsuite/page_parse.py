"""The frontend category's page parser: a generated page parsed with html5lib (HTML), tinycss2 (CSS) and
tree-sitter's JavaScript grammar, with the helpers the static checks use (``Page``), and the small CSS-selector
engine that counts elements on html5lib's tree when no browser is available (``select``).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from steps.evalsuite.text import clip


@dataclass
class Page:
    """A generated page, parsed: the html5lib tree and its parse errors, the CSS rules (tinycss2) and the scripts
    (tree-sitter), with the helpers the checks use."""
    html: str
    doc: Any = None
    html_errors: list[str] = field(default_factory=list)
    css_errors: list[str] = field(default_factory=list)
    js_errors: list[str] = field(default_factory=list)
    declarations: list[tuple[str, str, str]] = field(default_factory=list)  # (at-rule context, property, value)
    at_rules: list[tuple[str, str]] = field(default_factory=list)           # (name, prelude)
    selectors: list[str] = field(default_factory=list)
    js_trees: list[Any] = field(default_factory=list)
    external: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, html: str) -> Page:
        import html5lib
        parser = html5lib.HTMLParser(tree=html5lib.getTreeBuilder("etree"), namespaceHTMLElements=False)
        page = cls(html, parser.parse(html))
        page.html_errors = [f"line {line}:{col} {code}" for (line, col), code, _ in parser.errors]
        for i, el in enumerate(page.doc.iter("style")):
            page._css("".join(el.itertext()), f"<style> #{i + 1}")
        for el in page.doc.iter():
            if isinstance(el.tag, str) and el.get("style"):
                page._css(f"x{{{el.get('style')}}}", f"style attribute of <{el.tag}>")
        for i, el in enumerate(page.doc.iter("script")):
            kind = (el.get("type") or "text/javascript").lower()
            if el.get("src"):
                page.external.append(f"<script src={el.get('src')!r}>")
            elif kind in ("text/javascript", "module", "application/javascript", "text/ecmascript"):
                page._js("".join(el.itertext()), f"<script> #{i + 1}")
        for el in page.doc.iter():
            if not isinstance(el.tag, str):
                continue
            for name, value in el.attrib.items():
                if name.startswith("on") and value.strip():
                    page._js(value, f"{name} attribute of <{el.tag}>")
            if el.tag == "link" and "stylesheet" in (el.get("rel") or "").lower():
                page.external.append(f"<link rel=stylesheet href={el.get('href')!r}>")
            if el.tag in ("img", "iframe", "video", "audio", "source") and re.match(r"(?i)\s*(https?:)?//",
                                                                                     el.get("src") or ""):
                page.external.append(f"<{el.tag} src={el.get('src')!r}>")
        return page

    def _css(self, css: str, where: str) -> None:
        import tinycss2
        sentinel = "mergeforge-end"
        rules = tinycss2.parse_stylesheet(css + f"\n{sentinel}{{}}", skip_comments=True, skip_whitespace=True)
        if not any(r.type == "qualified-rule" and tinycss2.serialize(r.prelude).strip() == sentinel for r in rules):
            self.css_errors.append(f"{where}: a block is not closed (unbalanced {{)")
        self._css_rules(rules, "", where)

    def _css_rules(self, rules: list[Any], context: str, where: str) -> None:
        import tinycss2
        for rule in rules:
            if rule.type == "error":
                self.css_errors.append(f"{where} line {rule.source_line}: {rule.message}")
            elif rule.type == "at-rule":
                name, prelude = rule.lower_at_keyword, tinycss2.serialize(rule.prelude).strip()
                self.at_rules.append((name, prelude))
                if rule.content is None:
                    continue
                inner = f"@{name} {prelude}"
                if name in ("media", "supports", "container", "layer", "document"):
                    self._css_rules(tinycss2.parse_rule_list(rule.content, skip_comments=True,
                                                             skip_whitespace=True), inner, where)
                else:   # @keyframes, @font-face, @page: their blocks hold rules or declarations
                    self._css_block(rule.content, inner, where)
            elif rule.type == "qualified-rule":
                selector = tinycss2.serialize(rule.prelude).strip()
                if "}" in selector:
                    self.css_errors.append(f"{where} line {rule.source_line}: unbalanced }} before "
                                           f"{clip(selector, 40)!r}")
                if selector != "mergeforge-end":
                    self.selectors.append(selector)
                self._css_block(rule.content, context, where)

    def _css_block(self, content: list[Any], context: str, where: str) -> None:
        import tinycss2
        items = tinycss2.parse_blocks_contents(content, skip_comments=True, skip_whitespace=True)
        for item in items:
            if item.type == "declaration":
                self.declarations.append((context, item.lower_name, tinycss2.serialize(item.value).strip().lower()))
            elif item.type == "error":
                self.css_errors.append(f"{where} line {item.source_line}: {item.message}")
            else:       # nested rules (CSS nesting, keyframe selectors)
                self._css_rules([item], context, where)

    def _js(self, source: str, where: str) -> None:
        tree = _js_parser().parse(source.encode("utf-8"))
        self.js_trees.append(tree)
        if tree.root_node.has_error:
            bad = next(_error_nodes(tree.root_node), None)
            at = f" at line {bad.start_point[0] + 1}:{bad.start_point[1] + 1}" if bad is not None else ""
            kind = f"missing {bad.type!r}" if bad is not None and bad.is_missing else "syntax error"
            self.js_errors.append(f"{where}: {kind}{at}")

    # -- CSS features
    def css_value(self, prop: str, pattern: str, context: str = "") -> bool:
        """A declaration of ``prop`` (a regex) whose value matches ``pattern``, inside an at-rule matching
        ``context`` (a regex; '' for anywhere)."""
        return any(re.fullmatch(prop, p) and re.search(pattern, v) and re.search(context, c)
                   for c, p, v in self.declarations)

    def at_rule(self, name: str, prelude: str = "") -> int:
        return sum(1 for n, p in self.at_rules if n == name and re.search(prelude, p, re.I))

    # -- JavaScript features, from the syntax trees
    def js_nodes(self, kind: str) -> Iterator[Any]:
        for tree in self.js_trees:
            stack = [tree.root_node]
            while stack:
                node = stack.pop()
                if node.type == kind:
                    yield node
                stack.extend(node.children)

    def js_calls(self, name: str, first_string: str | None = None) -> bool:
        """A call of ``name`` (a function or a method); with ``first_string``, whose first argument is a string
        literal matching it (``addEventListener("keydown", ...)``)."""
        for node in self.js_nodes("call_expression"):
            fn = node.child_by_field_name("function")
            if fn is None:
                continue
            callee = fn.child_by_field_name("property") if fn.type == "member_expression" else fn
            if callee is None or _text(callee) != name:
                continue
            if first_string is None:
                return True
            args = node.child_by_field_name("arguments")
            first = next((a for a in args.named_children if a.type != "comment"), None) if args else None
            if first is not None and first.type in ("string", "template_string") and re.fullmatch(
                    first_string, _text(first)[1:-1]):
                return True
        return False

    def js_new(self, name: str) -> bool:
        return any(_text(n.child_by_field_name("constructor")) == name for n in self.js_nodes("new_expression")
                   if n.child_by_field_name("constructor") is not None)

    def js_names(self) -> set[str]:
        return {_text(n) for kind in ("identifier", "property_identifier") for n in self.js_nodes(kind)}

    def js_strings(self) -> set[str]:
        return {_text(n) for n in self.js_nodes("string_fragment")}

    # -- elements, on html5lib's tree
    def count(self, selector: str) -> int:
        return sum(1 for _ in select(self.doc, selector))


@functools.cache
def _js_parser() -> Any:
    import tree_sitter_javascript
    from tree_sitter import Language, Parser
    return Parser(Language(tree_sitter_javascript.language()))


def _error_nodes(node: Any) -> Iterator[Any]:
    if node.type == "ERROR" or node.is_missing:
        yield node
        return
    for child in node.children:
        if child.has_error or child.is_missing:
            yield from _error_nodes(child)


def _text(node: Any) -> str:
    return node.text.decode("utf-8", "replace") if node is not None and node.text is not None else ""


# Selectors on html5lib's ElementTree: compound selectors (tag, #id, .class, [attr], [attr=value], [attr*=value])
# joined by descendant (space) and child (>) combinators, and selector lists (a, b). The browser uses its own engine.
_COMPOUND = re.compile(r"""(?P<tag>[a-zA-Z][\w-]*|\*)?(?P<rest>(?:\#[\w-]+|\.[\w-]+|\[[^\]]+\])*)""")
_PART = re.compile(r"""\#([\w-]+)|\.([\w-]+)|\[\s*([\w-]+)\s*(?:([*^$~]?=)\s*["']?([^"'\]]*)["']?\s*)?\]""")


def select(doc: Any, selector: str) -> Iterator[Any]:
    seen: set[int] = set()
    parents = {id(c): p for p in doc.iter() for c in p}
    for alternative in selector.split(","):
        steps = re.findall(r">|[^\s>]+", alternative.strip())
        for el in doc.iter():
            if isinstance(el.tag, str) and id(el) not in seen and _matches_path(el, steps, parents):
                seen.add(id(el))
                yield el


def _matches_path(el: Any, steps: list[str], parents: dict[int, Any]) -> bool:
    if not steps or not _matches(el, steps[-1]):
        return False
    rest = steps[:-1]
    if not rest:
        return True
    child_only = rest[-1] == ">"
    rest = rest[:-1] if child_only else rest
    parent = parents.get(id(el))
    while parent is not None:
        if _matches_path(parent, rest, parents):
            return True
        if child_only:
            return False
        parent = parents.get(id(parent))
    return False


def _matches(el: Any, compound: str) -> bool:
    m = _COMPOUND.fullmatch(compound)
    if m is None:
        raise ValueError(f"selector part {compound!r} is not supported")
    tag = el.tag.rsplit("}", 1)[-1]            # svg and math elements keep their namespace
    if m.group("tag") not in (None, "*") and tag.lower() != m.group("tag").lower():
        return False
    for ident, cls, attr, op, value in _PART.findall(m.group("rest")):
        if ident and el.get("id") != ident:
            return False
        if cls and cls not in (el.get("class") or "").split():
            return False
        if attr:
            have = el.get(attr)
            if have is None or (op == "=" and have != value) or (op == "*=" and value not in have) or (
                    op == "^=" and not have.startswith(value)) or (op == "$=" and not have.endswith(value)) or (
                    op == "~=" and value not in have.split()):
                return False
    return True
