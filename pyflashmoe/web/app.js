// The web chat of `flashmoe serve` (GET /): plain JavaScript, no build step, no library, nothing
// fetched from another host. It talks to this server's OpenAI API (v1/chat/completions, streamed as
// Server-Sent Events; the reasoning arrives in delta.reasoning_content).
//
// Safety: model text reaches the page only as text nodes (textContent) or through renderMarkdown,
// which HTML-escapes every piece of text before it adds its own tags; link targets are limited to
// http(s) and mailto. The server also sends a Content-Security-Policy without inline scripts.
"use strict";

(function () {
  // ------------------------------------------------------------------ markdown (escaping first)
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ESC[c]);
  }

  // emphasis on already-escaped text: only this function's own tags are added
  function emphasis(s) {
    return s
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
      .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
  }

  function safeUrl(u) {
    return /^(https?:\/\/|mailto:)/i.test(u) ? u : null;
  }

  function link(href, inner) {
    return '<a href="' + escapeHtml(href) + '" target="_blank" rel="noopener noreferrer">' + inner + "</a>";
  }

  // code spans, [text](url) links, bare http(s) URLs; the rest escaped, then emphasis
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(\s*<?([^()\s<>]+)>?(?:\s+"[^"]*")?\s*\)|(https?:\/\/[^\s<>()"'`]*[^\s<>()"'`.,;:!?*_~])/g;
  function inline(raw) {
    let out = "";
    let last = 0;
    let m;
    INLINE.lastIndex = 0;
    while ((m = INLINE.exec(raw)) !== null) {
      out += emphasis(escapeHtml(raw.slice(last, m.index)));
      if (m[1] !== undefined) {
        let code = m[2];
        if (/^ [\s\S]* $/.test(code) && code.trim()) code = code.slice(1, -1);
        out += "<code>" + escapeHtml(code) + "</code>";
      } else if (m[3] !== undefined) {
        const href = safeUrl(m[4]);
        const text = emphasis(escapeHtml(m[3]));
        out += href ? link(href, text) : emphasis(escapeHtml(m[0]));
      } else {
        out += link(m[5], escapeHtml(m[5]));
      }
      last = INLINE.lastIndex;
    }
    out += emphasis(escapeHtml(raw.slice(last)));
    return out.replace(/\n/g, "<br>");
  }

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  const HR = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?/;
  const LIST = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function indentOf(l) {
    return l.match(/^\s*/)[0].replace(/\t/g, "    ").length;
  }

  function isTableStart(lines, i) {
    return i + 1 < lines.length && lines[i].indexOf("|") >= 0 && TABLE_SEP.test(lines[i + 1]) &&
      lines[i + 1].indexOf("-") >= 0;
  }

  function startsBlock(lines, i) {
    const l = lines[i];
    return FENCE.test(l) || HEADING.test(l) || HR.test(l) || QUOTE.test(l) || LIST.test(l) ||
      isTableStart(lines, i);
  }

  function splitRow(l) {
    let s = l.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
    return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
  }

  function table(lines, i) {
    const head = splitRow(lines[i]);
    const align = splitRow(lines[i + 1]).map((c) =>
      /^:-+:$/.test(c) ? ' class="al-c"' : /^-+:$/.test(c) ? ' class="al-r"' : "");
    let html = "<table><thead><tr>" +
      head.map((c, k) => "<th" + (align[k] || "") + ">" + inline(c) + "</th>").join("") + "</tr></thead><tbody>";
    i += 2;
    while (i < lines.length && lines[i].trim() && lines[i].indexOf("|") >= 0) {
      const cells = splitRow(lines[i]);
      html += "<tr>" + head.map((_, k) => "<td" + (align[k] || "") + ">" + inline(cells[k] || "") + "</td>").join("") + "</tr>";
      i++;
    }
    return [html + "</tbody></table>", i];
  }

  function list(lines, i) {
    const first = LIST.exec(lines[i]);
    const base = indentOf(first[1]);
    const ordered = /\d/.test(first[2]);
    let html = "";
    const items = [];
    let loose = false;
    while (i < lines.length) {
      const m = LIST.exec(lines[i]);
      if (!m || indentOf(m[1]) !== base || /\d/.test(m[2]) !== ordered) break;
      const body = [m[3]];
      const contentIndent = base + m[2].length + 1;
      i++;
      while (i < lines.length) {
        const l = lines[i];
        if (!l.trim()) {
          let j = i;
          while (j < lines.length && !lines[j].trim()) j++;
          if (j < lines.length && indentOf(lines[j]) > base) {
            if (!LIST.test(lines[j]) || indentOf(lines[j]) >= contentIndent) loose = true;
            for (; i < j; i++) body.push("");
            continue;
          }
          if (j < lines.length) {
            const n = LIST.exec(lines[j]);
            if (n && indentOf(n[1]) === base && /\d/.test(n[2]) === ordered) loose = true;
          }
          i = j;
          break;
        }
        const ind = indentOf(l);
        if (ind > base) {
          body.push(l.replace(/^\s+/, (w) => " ".repeat(Math.max(0, indentOf(w) - contentIndent))));
          i++;
          continue;
        }
        if (startsBlock(lines, i)) break;
        body.push(l); // a lazy continuation of the item's paragraph
        i++;
      }
      items.push(body);
      if (i < lines.length && !lines[i].trim()) break;
    }
    const start = ordered ? parseInt(first[2], 10) : 1;
    html += ordered ? (start !== 1 ? '<ol start="' + start + '">' : "<ol>") : "<ul>";
    for (const body of items) html += "<li>" + blocks(body, !loose) + "</li>";
    html += ordered ? "</ol>" : "</ul>";
    return [html, i];
  }

  // block structure; tight: paragraphs without <p> (inside a tight list item)
  function blocks(lines, tight) {
    let html = "";
    let i = 0;
    while (i < lines.length) {
      const l = lines[i];
      if (!l.trim()) { i++; continue; }
      let m = FENCE.exec(l);
      if (m) {
        const fence = m[1];
        const lang = m[2];
        const code = [];
        i++;
        while (i < lines.length) {
          const c = lines[i];
          const close = c.trim();
          if (close.length >= fence.length && close === fence[0].repeat(close.length)) { i++; break; }
          code.push(c);
          i++;
        }
        html += "<pre>" + (lang ? '<span class="lang">' + escapeHtml(lang) + "</span>" : "") +
          '<button type="button" class="copy">Copy</button><code>' + escapeHtml(code.join("\n")) + "</code></pre>";
        continue;
      }
      if ((m = HEADING.exec(l))) {
        const n = m[1].length;
        html += "<h" + n + ">" + inline(m[2]) + "</h" + n + ">";
        i++;
        continue;
      }
      if (HR.test(l)) { html += "<hr>"; i++; continue; }
      if (QUOTE.test(l)) {
        const q = [];
        while (i < lines.length && lines[i].trim() && (QUOTE.test(lines[i]) || !startsBlock(lines, i))) {
          q.push(lines[i].replace(QUOTE, ""));
          i++;
        }
        html += "<blockquote>" + blocks(q, false) + "</blockquote>";
        continue;
      }
      if (LIST.test(l)) {
        const [h, j] = list(lines, i);
        html += h;
        i = j;
        continue;
      }
      if (isTableStart(lines, i)) {
        const [h, j] = table(lines, i);
        html += h;
        i = j;
        continue;
      }
      const para = [l.trim()];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) {
        para.push(lines[i].trim());
        i++;
      }
      html += tight ? inline(para.join("\n")) : "<p>" + inline(para.join("\n")) + "</p>";
    }
    return html;
  }

  // Markdown -> HTML string. Every piece of the input is escaped; the only tags are this
  // renderer's own (h1-h6 p br ul ol li pre code span button blockquote table thead tbody tr th td
  // hr a strong em del).
  function renderMarkdown(text) {
    return blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), false);
  }

  // ------------------------------------------------------------------ page state
  const $ = (id) => document.getElementById(id);
  const SETTINGS_KEY = "flashmoe.settings";
  const FIELDS = ["system", "temperature", "top_p", "top_k", "max_tokens", "api-key", "extra"];
  const state = { messages: [], busy: null, model: null, chat: 0 }; // chat: bumped by New chat

  function loadSettings() {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") || {}; } catch (e) { saved = {}; }
    for (const f of FIELDS) if (typeof saved[f] === "string") $(f).value = saved[f];
    if (typeof saved.thinking === "boolean") $("thinking").checked = saved.thinking;
  }

  function saveSettings() {
    const s = { thinking: $("thinking").checked };
    for (const f of FIELDS) s[f] = $(f).value;
    try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(s)); } catch (e) { /* private mode */ }
  }

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text || "";
    el.classList.toggle("error", !!isError);
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function errorText(status, body) {
    let msg = "";
    try {
      const j = JSON.parse(body);
      msg = (j && j.error && (j.error.message || j.error)) || "";
      if (typeof msg !== "string") msg = JSON.stringify(msg);
    } catch (e) {
      msg = body ? body.slice(0, 500) : "";
    }
    let text = "HTTP " + status + (msg ? ": " + msg : "");
    if (status === 401) text += "\nSet the server's API key in Settings.";
    return text;
  }

  async function loadModel() {
    const el = $("model-name");
    try {
      const r = await fetch("v1/models", { headers: headers(false) });
      if (r.status === 401) {
        el.textContent = "API key needed (Settings)";
        el.classList.add("warn");
        state.model = null;
        return;
      }
      if (!r.ok) throw new Error(errorText(r.status, await r.text()));
      const j = await r.json();
      state.model = j.data && j.data[0] ? j.data[0].id : null;
      el.textContent = state.model || "(no model)";
      el.classList.remove("warn");
    } catch (e) {
      el.textContent = "server not reachable";
      el.classList.add("warn");
      setStatus(String(e.message || e), true);
    }
  }

  // ------------------------------------------------------------------ messages in the page
  function scroller() { return $("chat"); }
  function nearBottom() {
    const c = scroller();
    return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
  }
  function toBottom() { const c = scroller(); c.scrollTop = c.scrollHeight; }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function addUser(text) {
    const m = el("div", "msg user");
    m.appendChild(el("div", "who", "You"));
    m.appendChild(el("div", "body", text));
    $("messages").appendChild(m);
    $("empty").hidden = true;
  }

  // one assistant answer being streamed into the page
  class Answer {
    constructor() {
      this.root = el("div", "msg assistant");
      this.root.appendChild(el("div", "who", "Assistant"));
      this.body = el("div", "body");
      this.answer = el("div", "answer cursor");
      this.body.appendChild(this.answer);
      this.root.appendChild(this.body);
      this.meta = el("div", "meta");
      this.root.appendChild(this.meta);
      $("messages").appendChild(this.root);
      this.content = "";
      this.reasoning = "";
      this.toolCalls = [];
      this.details = null;
      this.pending = false;
      this.thinkStart = null;
      this.thinkEnd = null;
    }
    thinking(text) {
      if (!this.details) {
        this.details = el("details", "thinking");
        this.details.open = true; // open while it streams, folded when the answer starts
        this.summary = el("summary", null, "Thinking\u2026");
        this.thought = el("div", "thought");
        this.details.appendChild(this.summary);
        this.details.appendChild(this.thought);
        this.body.insertBefore(this.details, this.answer);
        this.thinkStart = performance.now();
      }
      this.reasoning += text;
      this.schedule();
    }
    foldThinking() {
      if (this.details && this.thinkEnd === null) {
        this.thinkEnd = performance.now();
        this.details.open = false;
        const s = (this.thinkEnd - this.thinkStart) / 1000;
        this.summary.textContent = "Thought for " + s.toFixed(s < 10 ? 2 : 1) + " s";
      }
    }
    text(t) {
      if (t) this.foldThinking();
      this.content += t;
      this.schedule();
    }
    schedule() {
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => this.render());
    }
    render() {
      this.pending = false;
      const stick = nearBottom();
      if (this.details) this.thought.textContent = this.reasoning;
      this.answer.innerHTML = renderMarkdown(this.content); // renderMarkdown escapes all text
      if (stick) toBottom();
    }
    tools(calls) {
      for (const c of calls) {
        const f = c.function || {};
        this.toolCalls.push(c);
        this.content += "\n\n```tool_call\n" + (f.name || "?") + "(" + (f.arguments || "") + ")\n```\n";
      }
      this.schedule();
    }
    error(text) {
      this.foldThinking();
      this.body.appendChild(el("div", "error", text));
    }
    finish(meta) {
      this.foldThinking();
      this.render();
      this.answer.classList.remove("cursor");
      this.meta.textContent = meta;
      this.root.dataset.done = "1";
    }
  }

  function num(id, parse) {
    const v = $(id).value.trim();
    if (!v) return undefined;
    const n = parse(v);
    if (!Number.isFinite(n)) throw new Error(id + ": not a number: " + v);
    return n;
  }

  function requestBody() {
    const msgs = [];
    const system = $("system").value;
    if (system.trim()) msgs.push({ role: "system", content: system });
    for (const m of state.messages) msgs.push({ role: m.role, content: m.content });
    const body = {
      messages: msgs, stream: true, stream_options: { include_usage: true },
      chat_template_kwargs: { enable_thinking: $("thinking").checked },
    };
    if (state.model) body.model = state.model;
    const t = num("temperature", parseFloat); if (t !== undefined) body.temperature = t;
    const p = num("top_p", parseFloat); if (p !== undefined) body.top_p = p;
    const k = num("top_k", (v) => parseInt(v, 10)); if (k !== undefined) body.top_k = k;
    const mt = num("max_tokens", (v) => parseInt(v, 10)); if (mt !== undefined) body.max_tokens = mt;
    const extra = $("extra").value.trim();
    $("extra").classList.remove("bad");
    if (extra) {
      let x;
      try { x = JSON.parse(extra); } catch (e) { x = null; }
      if (!x || typeof x !== "object" || Array.isArray(x)) {
        $("extra").classList.add("bad");
        throw new Error("Extra request fields: not a JSON object");
      }
      Object.assign(body, x);
    }
    return body;
  }

  // reads an SSE response; calls onEvent(parsed JSON) per `data:` event until [DONE]
  async function readEvents(resp, onEvent) {
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return true;
        onEvent(JSON.parse(data));
      }
    }
    return false;
  }

  function fmt(x, d) { return x.toFixed(d); }

  async function send(text) {
    if (state.busy) return;
    let body;
    state.messages.push({ role: "user", content: text });
    addUser(text);
    toBottom();
    const ans = new Answer();
    try {
      body = requestBody();
    } catch (e) {
      state.messages.pop();
      ans.error(String(e.message || e));
      ans.finish("not sent");
      return;
    }
    const ctrl = new AbortController();
    const chat = state.chat;
    state.busy = ctrl;
    $("send").disabled = true;
    $("stop").hidden = false;
    setStatus("Generating\u2026");
    const t0 = performance.now();
    let tFirst = null;
    let chunks = 0; // streamed pieces: about one token each (a count while no usage came)
    let usage = null;
    let finish = null;
    let failed = false;
    let stopped = false;
    try {
      const resp = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(true), body: JSON.stringify(body), signal: ctrl.signal,
      });
      if (!resp.ok) {
        failed = true;
        ans.error(errorText(resp.status, await resp.text()));
        if (resp.status === 401) openSettings(true);
      } else {
        const complete = await readEvents(resp, (ev) => {
          if (ev.error) {
            failed = true;
            ans.error("server error: " + (ev.error.message || JSON.stringify(ev.error)));
            return;
          }
          if (ev.usage) usage = ev.usage;
          const ch = ev.choices && ev.choices[0];
          if (!ch) return;
          const d = ch.delta || {};
          if (d.reasoning_content || d.content) chunks++;
          if (d.reasoning_content) {
            if (tFirst === null) tFirst = performance.now();
            ans.thinking(d.reasoning_content);
          }
          if (d.content) {
            if (tFirst === null) tFirst = performance.now();
            ans.text(d.content);
          }
          if (d.tool_calls) ans.tools(d.tool_calls);
          if (ch.finish_reason) finish = ch.finish_reason;
        });
        if (!complete && !failed) {
          failed = true;
          ans.error("the stream ended early (the server closed the connection)");
        }
      }
    } catch (e) {
      if (e.name === "AbortError") {
        stopped = true;
      } else {
        failed = true;
        ans.error("request failed: " + String(e.message || e));
      }
    }
    const t1 = performance.now();
    const parts = [];
    if (stopped) parts.push("stopped");
    if (usage) {
      const n = usage.completion_tokens;
      parts.push(n + " tokens");
      if (tFirst !== null && n > 1 && t1 > tFirst) parts.push(fmt((n - 1) / ((t1 - tFirst) / 1000), 1) + " tok/s");
      const cached = usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens;
      parts.push("prompt " + usage.prompt_tokens + (cached ? " (" + cached + " cached)" : ""));
    } else if (chunks) {
      parts.push("~" + chunks + " tokens");
      if (chunks > 1 && t1 > tFirst) parts.push("~" + fmt((chunks - 1) / ((t1 - tFirst) / 1000), 1) + " tok/s");
    }
    if (tFirst !== null) parts.push("first token " + fmt((tFirst - t0) / 1000, 2) + " s");
    if (finish && finish !== "stop") parts.push("finish: " + finish);
    parts.push(fmt((t1 - t0) / 1000, 1) + " s");
    ans.finish(parts.join(" \u00b7 "));
    if (chat !== state.chat) {
      // New chat was pressed meanwhile: this answer belongs to the forgotten conversation
    } else if (ans.content || ans.toolCalls.length) {
      state.messages.push({ role: "assistant", content: ans.content });
    } else if (failed) {
      state.messages.pop(); // nothing came back: the question can be sent again
    } else {
      state.messages.push({ role: "assistant", content: "" });
    }
    state.busy = null;
    $("send").disabled = false;
    $("stop").hidden = true;
    setStatus(failed ? "The last request failed." : stopped ? "Stopped." : "", failed);
  }

  function stop() {
    if (state.busy) state.busy.abort();
  }

  function newChat() {
    stop();
    state.chat++;
    state.messages = [];
    $("messages").textContent = "";
    $("empty").hidden = false;
    setStatus("");
    $("input").focus();
  }

  function openSettings(open) {
    const s = $("settings");
    s.hidden = !open;
    $("toggle-settings").setAttribute("aria-expanded", String(open));
  }

  function init() {
    loadSettings();
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("input").value;
      if (!text.trim() || state.busy) return;
      $("input").value = "";
      send(text);
    });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newChat);
    $("toggle-settings").addEventListener("click", () => openSettings($("settings").hidden));
    $("settings-form").addEventListener("input", saveSettings);
    $("settings-form").addEventListener("submit", (e) => e.preventDefault());
    $("api-key").addEventListener("change", loadModel);
    $("reset-settings").addEventListener("click", () => {
      for (const f of FIELDS) if (f !== "api-key") $(f).value = "";
      $("thinking").checked = true;
      saveSettings();
    });
    $("messages").addEventListener("click", (e) => {
      const b = e.target.closest("button.copy");
      if (!b) return;
      const code = b.parentElement.querySelector("code");
      const done = () => { b.textContent = "Copied"; setTimeout(() => { b.textContent = "Copy"; }, 1200); };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(code.textContent).then(done, () => {});
      } else {
        const r = document.createRange();
        r.selectNodeContents(code);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(r);
      }
    });
    loadModel();
    $("input").focus();
  }

  window.flashmoe = { renderMarkdown, escapeHtml, state };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
