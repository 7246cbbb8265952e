"""multilingual: an answer written in Chinese (checked by Unicode ranges), an English -> French translation."""
from __future__ import annotations

import re
import unicodedata

from steps.evalsuite.core import Grade, Reply, Test, fail, ok, register
from steps.evalsuite.text import clip, has_word

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _chinese(reply: Reply) -> Grade:
    han = len(_CJK.findall(reply.text))
    latin = len(re.findall(r"[A-Za-z]", reply.text))
    if han < 20:
        return fail(f"{han} Chinese characters, expected at least 20: {clip(reply.text)!r}")
    if han < 3 * latin:
        return fail(f"mostly not Chinese: {han} Chinese characters, {latin} Latin letters")
    if "长城" not in reply.text and "長城" not in reply.text:
        return fail("does not mention the Great Wall (长城)")
    return ok(f"{han} Chinese characters, {latin} Latin letters")


register(Test("chinese_answer", "multilingual",
              [{"role": "user", "content": "请用中文写两三句话，简单介绍一下中国的长城。"}], _chinese, max_tokens=256))


def _fold(text: str) -> str:
    """Lowercase, typographic apostrophes straightened."""
    return unicodedata.normalize("NFC", text).lower().replace("’", "'")


def _french(reply: Reply) -> Grade:
    text = _fold(reply.text)
    missing = [w for w in ("chat", "chaise", "rouge", "fenêtre") if not has_word(text, w)]
    if missing:
        return fail(f"missing {', '.join(missing)}: {clip(reply.text)!r}")
    if not re.search(r"\b(dort|dormir|endormi)", text):
        return fail(f"no form of dormir (sleeping): {clip(reply.text)!r}")
    if has_word(text, "the") or has_word(text, "sleeping"):
        return fail(f"English left in the translation: {clip(reply.text)!r}")
    return ok("chat, dort, chaise, rouge, fenêtre")


register(Test("translate_french", "multilingual", [{"role": "user", "content": (
    "Translate into French. Reply with the translation only.\n\n"
    "The cat is sleeping on the red chair near the window.")}], _french, max_tokens=96))
