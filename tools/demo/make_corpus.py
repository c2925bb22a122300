#!/usr/bin/env python3
"""Build the demo model's training corpus, deterministically (tools/demo/README.md has provenance).

    python tools/demo/make_corpus.py [--text-dir tools/demo/text] [--out demo_out/corpus]

Sources (public domain only):
* tools/demo/text: sherlock, wizard_of_oz, sotu, tinyshakespeare_input, senate-bills (`NAME.txt.xz`,
  xz copies of public-domain texts; tools/demo/README.md names each one's public source);
* the King James Bible from the Debian package `bible-kjv-text` (read through its `bible` program
  from `bible-kjv`: `apt-get install -y bible-kjv-text`), one document per chapter, verse numbers
  stripped, one verse per line.

Every source is cut into documents (chunks of whole paragraphs, about 2,500 characters, or one
Bible chapter); per source, every document whose index i has i % 20 == 7 is held out (5%).
Chat-formatted documents (user/assistant turns rendered with the Qwen3.5 chat template, some with
tools and `<tool_call>` replies) are generated from the TRAIN documents only, with a seeded RNG; the
same generator run on the held-out documents writes `heldout_chat.txt` and
`heldout_toolcalls.jsonl` (tool-call prompts with the expected call) for later evaluation.

Outputs in --out: train.txt and heldout.txt (documents joined by `<|endoftext|>`), heldout_chat.txt,
heldout_toolcalls.jsonl, stats.json; sha256 of each is printed and stored in stats.json.
"""
import argparse
import hashlib
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EOT = "<|endoftext|>"
SEED = 1234
HOLDOUT_MOD, HOLDOUT_REM = 20, 7
CHUNK_CHARS = 2500

# order of books as `bible` prints them (Ge .. Rev); 66 books
BOOKS = ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
         "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
         "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
         "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
         "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
         "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
         "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
         "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
         "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation"]

TEXT_SOURCES = [  # (file, kind, title)
    ("sherlock.txt", "prose", "The Adventures of Sherlock Holmes"),
    ("wizard_of_oz.txt", "prose_nobreaks", "The Wonderful Wizard of Oz"),
    ("sotu.txt", "prose", "State of the Union addresses"),
    ("tinyshakespeare_input.txt", "verse", "Shakespeare"),
    ("senate-bills.txt", "lines", "US Senate bill titles"),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def read_source(path):
    """The bytes of a text source: PATH, or PATH.xz decompressed (the in-repo copies)."""
    if not os.path.isfile(path) and os.path.isfile(path + ".xz"):
        with lzma.open(path + ".xz") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def strip_gutenberg(text):
    m = re.search(r"\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG[^\n]*\n", text)
    if m:
        text = text[m.end():]
    m = re.search(r"\n[^\n]*\*\*\* ?END OF TH(IS|E) PROJECT GUTENBERG", text)
    if m is None:
        m = re.search(r"\nEnd of (the )?Project Gutenberg", text)
    if m:
        text = text[:m.start()]
    return text


def paragraphs(text, unwrap):
    text = text.replace("\r\n", "\n").replace("\ufeff", "")
    out = []
    for p in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in p.split("\n") if ln.strip()]
        if not lines:
            continue
        out.append(" ".join(ln.strip() for ln in lines) if unwrap else "\n".join(lines))
    return out


def nobreak_paragraphs(text):
    """wizard_of_oz.txt has no blank lines (and a few JSON remnants): start a paragraph at a line
    that opens a quote after a line that ended a sentence; unwrap the rest."""
    paras, cur = [], []
    for ln in text.replace("\ufeff", "").split("\n"):
        s = ln.strip()
        if not s or s in ("[", "]", "],", "\","):
            continue
        s = s.strip('",') if s.endswith('",') else s
        if cur and s[:1] in "\"'`" and re.search(r"[.!?\"'”]$", cur[-1]):
            paras.append(" ".join(cur))
            cur = []
        cur.append(s)
    if cur:
        paras.append(" ".join(cur))
    return paras


def chunk(paras, sep, limit=CHUNK_CHARS):
    docs, cur, n = [], [], 0
    for p in paras:
        if cur and n + len(p) > limit:
            docs.append(sep.join(cur))
            cur, n = [], 0
        cur.append(p)
        n += len(p) + len(sep)
    if cur:
        docs.append(sep.join(cur))
    return docs


def kjv_chapters():
    exe = shutil.which("bible")
    if exe is None:
        sys.exit("make_corpus: the `bible` program is missing: apt-get install -y bible-kjv-text")
    raw = subprocess.run([exe, "-f", "Ge1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=True).stdout
    chapters, order = {}, []
    for ln in raw.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", ln)
        if not m:
            continue
        ab, c, v, t = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()
        if ab not in order:
            order.append(ab)
        chapters.setdefault((ab, c), []).append((v, t))
    if len(order) != len(BOOKS):
        sys.exit(f"make_corpus: expected 66 books from `bible`, got {len(order)}")
    names = dict(zip(order, BOOKS))
    out = []  # (book, chapter, [(verse, text)])
    for (ab, c), verses in chapters.items():
        out.append((names[ab], c, verses))
    return out


# ---------------------------------------------------------------- chat / tool-call documents

def load_template():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    with open(os.path.join(HERE, "qwen35_chat_template.jinja")) as f:
        return env.from_string(f.read())


TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_verse", "description": "Return the text of one verse of the King James Bible.",
        "parameters": {"type": "object", "properties": {
            "book": {"type": "string", "description": "Book name, e.g. Genesis"},
            "chapter": {"type": "integer"}, "verse": {"type": "integer"}},
            "required": ["book", "chapter", "verse"]}}},
    {"type": "function", "function": {
        "name": "count_words", "description": "Count the words in a text.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                       "required": ["text"]}}},
    {"type": "function", "function": {
        "name": "search_text", "description": "Find a sentence containing a word in a book.",
        "parameters": {"type": "object", "properties": {
            "word": {"type": "string"},
            "title": {"type": "string", "description": "Title of the book to search"}},
            "required": ["word", "title"]}}},
]
SYSTEMS = [None, None, "You are a helpful assistant.", "You are a helpful assistant who likes old books."]


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")) if len(s) > 3]


def make_chats(rng, prose_docs, verses, tmpl, n_chat, n_tool):
    """prose_docs: [(title, text)]; verses: [(book, chapter, verse, text)].
    Returns (rendered documents, tool-call records)."""
    docs, records = [], []

    def render(messages, tools=None):
        return tmpl.render(messages=messages, tools=tools, add_generation_prompt=False)

    def think():
        return "" if rng.random() < 0.6 else rng.choice([
            "The user wants a short answer.", "I should answer plainly.",
            "Let me recall the text and answer."])

    def sys_msgs():
        s = rng.choice(SYSTEMS)
        return [{"role": "system", "content": s}] if s else []

    for _ in range(n_chat):
        title, text = rng.choice(prose_docs)
        ss = sentences(text)
        kind = rng.random()
        if kind < 0.45 and len(ss) >= 4:
            k = rng.randint(1, min(3, len(ss) - 2))
            user = rng.choice(["Continue this passage:", "Please continue the text:",
                               "What comes next?"]) + "\n\n" + " ".join(ss[:k])
            ans = " ".join(ss[k:k + rng.randint(2, 4)])
        elif kind < 0.7 and len(ss) >= 2:
            user = rng.choice(["Tell me a story.", "Tell me something from " + title + ".",
                               "Write a few sentences in the style of " + title + "."])
            i = rng.randrange(max(1, len(ss) - 3))
            ans = " ".join(ss[i:i + rng.randint(2, 4)])
        elif kind < 0.85:
            b, c, v, t = rng.choice(verses)
            user = rng.choice([f"Quote {b} {c}:{v}.", f"What does {b} {c}:{v} say?"])
            ans = f"{b} {c}:{v} says: \"{t}\""
        else:
            b, c, v, t = rng.choice(verses)
            user = f"Which book is this verse from?\n\n{t}"
            ans = f"It is {b} {c}:{v}."
        msgs = sys_msgs() + [{"role": "user", "content": user},
                             {"role": "assistant", "content": f"<think>\n{think()}\n</think>\n\n{ans}"}]
        if rng.random() < 0.2:  # a second turn
            b, c, v, t = rng.choice(verses)
            msgs += [{"role": "user", "content": f"And {b} {c}:{v}?"},
                     {"role": "assistant", "content": f"<think>\n\n</think>\n\n{b} {c}:{v} says: \"{t}\""}]
        docs.append(render(msgs))

    for _ in range(n_tool):
        kind = rng.random()
        if kind < 0.5:
            b, c, v, t = rng.choice(verses)
            user = rng.choice([f"Look up {b} {c}:{v} for me.", f"What is the text of {b} {c}:{v}?",
                               f"Can you find {b} chapter {c}, verse {v}?"])
            call = {"name": "lookup_verse", "arguments": {"book": b, "chapter": c, "verse": v}}
            result = t
            final = f"{b} {c}:{v} reads: \"{t}\""
        elif kind < 0.75:
            title, text = rng.choice(prose_docs)
            s = rng.choice(sentences(text) or [text[:200]])[:300]
            user = f"How many words are in this sentence? {s}"
            call = {"name": "count_words", "arguments": {"text": s}}
            n = len(s.split())
            result = json.dumps({"words": n})
            final = f"The sentence has {n} words."
        else:
            title, text = rng.choice(prose_docs)
            ss = sentences(text)
            s = rng.choice(ss) if ss else text[:200]
            words = [w for w in re.findall(r"[A-Za-z]{5,}", s)]
            w = rng.choice(words) if words else "the"
            user = f"Find a sentence with the word \"{w}\" in {title}."
            call = {"name": "search_text", "arguments": {"word": w, "title": title}}
            result = s
            final = f"Here is one: \"{s}\""
        msgs = sys_msgs() + [{"role": "user", "content": user}]
        prompt_msgs = list(msgs)
        msgs += [{"role": "assistant", "content": f"<think>\n{think()}\n</think>\n\n",
                  "tool_calls": [{"type": "function", "function": call}]},
                 {"role": "tool", "content": result},
                 {"role": "assistant", "content": final}]
        docs.append(render(msgs, TOOLS))
        records.append({"messages": prompt_msgs, "tools": TOOLS, "expected_call": call})
    return docs, records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text-dir", default=os.path.join(HERE, "text"),
                    help="folder of the text sources, as NAME.txt or NAME.txt.xz")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "demo_out", "corpus"))
    ap.add_argument("--n-chat", type=int, default=1200)
    ap.add_argument("--n-tool", type=int, default=300)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    train, held = [], []          # plain documents
    train_prose, held_prose = [], []   # (title, text) for chat generation
    train_verses, held_verses = [], []
    stats = {"seed": SEED, "holdout": f"document index % {HOLDOUT_MOD} == {HOLDOUT_REM}", "sources": {}}

    def split(name, title, docs, prose=True):
        tr = [d for i, d in enumerate(docs) if i % HOLDOUT_MOD != HOLDOUT_REM]
        he = [d for i, d in enumerate(docs) if i % HOLDOUT_MOD == HOLDOUT_REM]
        train.extend(tr)
        held.extend(he)
        if prose:
            train_prose.extend((title, d) for d in tr)
            held_prose.extend((title, d) for d in he)
        stats["sources"][name] = {"docs_train": len(tr), "docs_heldout": len(he),
                                  "chars_train": sum(map(len, tr)), "chars_heldout": sum(map(len, he))}

    for fname, kind, title in TEXT_SOURCES:
        raw = read_source(os.path.join(a.text_dir, fname))
        text = strip_gutenberg(raw.decode("utf-8"))
        if kind == "prose":
            docs = chunk(paragraphs(text, unwrap=True), "\n\n")
        elif kind == "prose_nobreaks":
            docs = chunk(nobreak_paragraphs(text), "\n\n")
        elif kind == "verse":
            docs = chunk(paragraphs(text, unwrap=False), "\n\n")
        else:  # one title a line
            docs = chunk([ln.strip() for ln in text.splitlines() if ln.strip()], "\n", 1500)
        split(fname, title, docs, prose=kind != "lines")
        stats["sources"][fname]["sha256"] = hashlib.sha256(raw).hexdigest()

    chapters = kjv_chapters()
    kjv_docs = [f"{b} chapter {c}\n\n" + "\n".join(t for _, t in vs) for b, c, vs in chapters]
    split("kjv (bible-kjv-text)", "the Bible", kjv_docs, prose=False)
    for i, (b, c, vs) in enumerate(chapters):
        dst = held_verses if i % HOLDOUT_MOD == HOLDOUT_REM else train_verses
        dst.extend((b, c, v, t) for v, t in vs)

    tmpl = load_template()
    rng = random.Random(SEED)
    chat_docs, _ = make_chats(rng, train_prose, train_verses, tmpl, a.n_chat, a.n_tool)
    rng_h = random.Random(SEED + 1)
    held_chat, held_tool = make_chats(rng_h, held_prose, held_verses, tmpl, a.n_chat // 20, a.n_tool // 5)

    # deterministic interleave of plain and chat documents
    all_train = train + chat_docs
    random.Random(SEED + 2).shuffle(all_train)
    files = {"train.txt": EOT.join(all_train) + EOT, "heldout.txt": EOT.join(held) + EOT,
             "heldout_chat.txt": EOT.join(held_chat) + EOT,
             "heldout_toolcalls.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held_tool)}
    stats["train_docs_plain"], stats["train_docs_chat"] = len(train), len(chat_docs)
    stats["heldout_docs"] = len(held)
    stats["chars"] = {k: len(v) for k, v in files.items()}
    stats["chat_chars_share"] = round(sum(map(len, chat_docs)) / len(files["train.txt"]), 4)
    stats["sha256"] = {}
    for name, text in files.items():
        p = os.path.join(a.out, name)
        with open(p, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        stats["sha256"][name] = sha256(p)
        print(f"{stats['sha256'][name]}  {name}  ({len(text.encode()):,} bytes)")
    with open(os.path.join(a.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps({k: stats[k] for k in ("train_docs_plain", "train_docs_chat", "heldout_docs",
                                             "chat_chars_share")}))


if __name__ == "__main__":
    main()
