// chatforge web UI: one conversation, streamed from POST /v1/chat/completions (server-sent events).
// No framework and no build step. The conversation lives in `chat`; the page is redrawn from it.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = [];            // {role: "user"|"assistant", parts: [{type, text}], note?}
let controller = null;      // AbortController of the running request, null when idle

// ---- Markdown (a small safe subset: everything is escaped first) ---------------------------------

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function inline(s) {  // s is already escaped
  const codes = [];
  s = s.replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
  s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
       .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
       .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[+i] + "</code>");
}

function markdown(text) {
  const lines = text.split("\n");
  const out = [];
  let para = [], list = null;
  const endPara = () => { if (para.length) { out.push("<p>" + inline(para.join("<br>")) + "</p>"); para = []; } };
  const endList = () => { if (list) { out.push(`<${list.tag}>` + list.items.map((i) => "<li>" + inline(i) + "</li>").join("") + `</${list.tag}>`); list = null; } };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {  // a code block runs to the closing fence (or to the end while it streams)
      endPara(); endList();
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      const lang = fence[1] ? ` class="language-${escapeHtml(fence[1])}"` : "";
      out.push(`<pre><code${lang}>` + escapeHtml(code.join("\n")) + "</code></pre>");
      continue;
    }
    const esc = escapeHtml(line);
    const heading = esc.match(/^(#{1,3})\s+(.*)$/);
    const bullet = esc.match(/^\s*[-*]\s+(.*)$/);
    const numbered = esc.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) { endPara(); endList(); out.push(`<h${heading[1].length}>` + inline(heading[2]) + `</h${heading[1].length}>`); }
    else if (bullet || numbered) {
      endPara();
      const tag = bullet ? "ul" : "ol";
      if (!list || list.tag !== tag) { endList(); list = {tag, items: []}; }
      list.items.push((bullet || numbered)[1]);
    } else if (!line.trim()) { endPara(); endList(); }
    else { endList(); para.push(esc); }
  }
  endPara(); endList();
  return out.join("");
}

// ---- drawing ---------------------------------------------------------------------------------------

function toolBlock(part) {
  const d = document.createElement("details");
  d.className = "tool " + part.type;
  d.innerHTML = `<summary>${part.type === "python" ? "python tool call" : "tool output"}</summary>` +
    "<pre><code>" + escapeHtml(part.text) + "</code></pre>";
  return d;
}

function drawAssistant(bubble, msg, streaming) {
  bubble.replaceChildren();
  for (const part of msg.parts) {
    if (part.type === "text") {
      const div = document.createElement("div");
      div.innerHTML = markdown(part.text);
      bubble.appendChild(div);
    } else {
      bubble.appendChild(toolBlock(part));
    }
  }
  if (streaming) bubble.classList.add("cursor"); else bubble.classList.remove("cursor");
  if (msg.note) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = msg.note;
    bubble.appendChild(note);
  }
}

function button(label, onclick, cls) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.className = cls; b.onclick = onclick;
  return b;
}

function render() {
  const pane = $("messages");
  pane.replaceChildren();
  if (!chat.length) {
    pane.innerHTML = '<div id="empty" class="empty"><h1>chatforge</h1><p>Ask anything. Replies stream from your own model.</p></div>';
    return;
  }
  const busy = controller !== null;
  chat.forEach((msg, index) => {
    const row = document.createElement("div");
    row.className = "message " + msg.role;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    row.appendChild(bubble);
    const actions = document.createElement("div");
    actions.className = "actions";
    if (msg.role === "user") {
      bubble.textContent = msg.parts[0].text;
      if (!busy) actions.appendChild(button("Edit", () => startEdit(row, index), "edit"));
    } else {
      drawAssistant(bubble, msg, busy && index === chat.length - 1);
      if (!busy && index === chat.length - 1) actions.appendChild(button("Regenerate", regenerate, "regenerate"));
      if (!busy) actions.appendChild(button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(plainText(msg)), "copy"));
    }
    row.appendChild(actions);
    pane.appendChild(row);
  });
  pane.scrollTop = pane.scrollHeight;
}

function plainText(msg) {
  return msg.parts.map((p) => p.type === "text" ? p.text : "```" + (p.type === "python" ? "python" : "output") + "\n" + p.text + "\n```").join("\n");
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// ---- talking to the server -------------------------------------------------------------------------

function apiMessages() {
  return chat.map((m) => ({
    role: m.role,
    content: m.role === "user" ? m.parts[0].text : (m.parts.length ? m.parts.map((p) => ({type: p.type, text: p.text})) : ""),
  }));
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addPiece(msg, piece) {
  const last = msg.parts[msg.parts.length - 1];
  if (piece.open || (piece.text && (!last || last.type !== piece.kind))) msg.parts.push({type: piece.kind, text: ""});
  if (piece.text) msg.parts[msg.parts.length - 1].text += piece.text;
}

async function generate() {
  showError("");
  const msg = {role: "assistant", parts: []};
  const body = {
    messages: apiMessages(), stream: true,
    temperature: parseFloat($("temperature").value),
    top_k: parseInt($("top-k").value, 10) || undefined,
    max_tokens: parseInt($("max-tokens").value, 10) || undefined,
  };
  chat.push(msg);
  controller = new AbortController();
  setBusy(true);
  render();
  const bubble = () => document.querySelector("#messages .message.assistant:last-child .bubble");
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; const b = bubble(); if (b && controller) drawAssistant(b, msg, true); });
  };
  try {
    const res = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal});
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${res.status}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) {
            for (const piece of (choice.delta && choice.delta.chatforge_pieces) || []) addPiece(msg, piece);
            if (choice.finish_reason === "length") msg.note = "(reply cut at the length limit)";
          }
          redraw();
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") msg.note = "(stopped)";
    else { showError(e.message); if (!msg.parts.length) chat.pop(); }
  } finally {
    controller = null;
    setBusy(false);
    render();
  }
}

function send(text) {
  if (controller || !text.trim()) return;
  chat.push({role: "user", parts: [{type: "text", text}]});
  generate();
}

function stop() {
  if (controller) controller.abort();
}

function regenerate() {
  if (controller) return;
  if (chat.length && chat[chat.length - 1].role === "assistant") chat.pop();
  if (chat.length) generate();
}

function startEdit(row, index) {
  const bubble = row.querySelector(".bubble");
  row.querySelector(":scope > .actions").remove();
  const box = document.createElement("div");
  box.className = "edit-box";
  const area = document.createElement("textarea");
  area.value = chat[index].parts[0].text;
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(
    button("Save & submit", () => {
      if (!area.value.trim()) return;
      chat.splice(index);  // everything after the edited message is replaced by a new reply
      send(area.value);
    }, "save"),
    button("Cancel", render, "cancel"));
  box.append(area, actions);
  bubble.replaceWith(box);
  area.focus();
}

function newChat() {
  stop();
  chat.length = 0;
  showError("");
  render();
  $("input").focus();
}

// ---- wiring ----------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  $("input").style.height = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("input").addEventListener("input", () => {
  const el = $("input"); el.style.height = ""; el.style.height = Math.min(el.scrollHeight, 200) + "px";
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("api-key").value = localStorage.getItem("chatforge-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("chatforge-api-key", $("api-key").value.trim()));

fetch("/v1/models", {headers: headers()}).then((r) => r.ok ? r.json() : null).then((j) => {
  if (j && j.data && j.data[0]) $("model-name").textContent = j.data[0].id + " \u00b7 context " + j.data[0].context_length;
}).catch(() => {});
setBusy(false);
render();
