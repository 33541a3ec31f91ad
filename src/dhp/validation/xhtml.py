"""Narrative XHTML safety (FHIR txt-1 / txt-2): well-formed XHTML in the XHTML namespace, only the basic
formatting elements FHIR allows, no scripts, no event-handler attributes, no external resources.
"""

from __future__ import annotations

import html.entities
import re
import xml.etree.ElementTree as ET

XHTML_NS = "http://www.w3.org/1999/xhtml"
_NS = "{" + XHTML_NS + "}"

ALLOWED_ELEMENTS = frozenset({
    "p", "br", "div", "h1", "h2", "h3", "h4", "h5", "h6", "a", "span", "b", "em", "i", "strong", "small",
    "big", "tt", "dfn", "q", "var", "abbr", "acronym", "cite", "blockquote", "hr", "address",
    "bdo", "kbd", "sub", "sup", "ul", "ol", "li", "dl", "dt", "dd", "pre", "table", "caption", "colgroup",
    "col", "thead", "tr", "tfoot", "tbody", "th", "td", "code", "samp", "img", "map", "area", "u", "s",
    "strike", "font", "center", "ins", "del",
})
_XML_ENTITIES = {"amp", "lt", "gt", "quot", "apos"}
_ENTITY_RE = re.compile(r"&([A-Za-z][A-Za-z0-9]*);")
_URL_IN_STYLE = re.compile(r"url\s*\(\s*['\"]?\s*(?!data:|#)([^)'\"]+)", re.I)


def _named_entities(text: str) -> str:
    """HTML named entities (``&nbsp;``) are common in narratives; XML only knows five. Expand the rest."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in _XML_ENTITIES:
            return m.group(0)
        cp = html.entities.name2codepoint.get(name)
        return f"&#{cp};" if cp is not None else m.group(0)
    return _ENTITY_RE.sub(sub, text) if "&" in text else text


def _external(url: str) -> bool:
    u = url.strip().lower()
    return u.startswith(("http://", "https://", "//", "ftp:", "file:"))


def check_xhtml(div: str) -> list[str]:
    """Problems with a Narrative.div value; empty when it is safe and well-formed."""
    if "<!DOCTYPE" in div or "<!ENTITY" in div:
        return ["narrative must not contain a DOCTYPE or entity declarations"]
    try:
        root = ET.fromstring(_named_entities(div))
    except ET.ParseError as e:
        return [f"narrative is not well-formed XHTML: {e}"]
    problems: list[str] = []
    if root.tag != _NS + "div":
        problems.append('narrative root must be <div xmlns="http://www.w3.org/1999/xhtml">')
    has_text = False
    for el in root.iter():
        tag = el.tag if isinstance(el.tag, str) else ""
        local = tag[len(_NS):] if tag.startswith(_NS) else tag
        if not tag.startswith(_NS):
            problems.append(f"element <{local}> is not in the XHTML namespace")
        elif local not in ALLOWED_ELEMENTS:
            problems.append(f"element <{local}> is not allowed in narrative (only basic formatting elements)")
        for attr, value in el.attrib.items():
            name = attr.rsplit("}", 1)[-1].lower()
            if name.startswith("on"):
                problems.append(f"event attribute '{name}' on <{local}> is not allowed in narrative")
            elif name in ("href", "src", "action", "background", "usemap") and \
                    value.strip().lower().startswith(("javascript:", "vbscript:", "data:text/html")):
                problems.append(f"script URL in '{name}' on <{local}> is not allowed in narrative")
            elif name == "src" and _external(value):
                problems.append(f"<{local}> loads an external resource ({value}); narrative must be self-contained")
            elif name == "style":
                low = value.lower()
                if "expression(" in low or "javascript:" in low:
                    problems.append(f"script in style attribute on <{local}> is not allowed")
                m = _URL_IN_STYLE.search(value)
                if m and _external(m.group(1)):
                    problems.append(f"style on <{local}> loads an external resource ({m.group(1).strip()})")
        if (el.text and el.text.strip()) or (el.tail and el.tail.strip() and el is not root) or local == "img":
            has_text = True
    if not has_text:
        problems.append("narrative has no content (txt-2: it must have some non-whitespace content)")
    return problems
