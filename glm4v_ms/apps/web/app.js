// glm4v_ms chat page. It talks only to the server's public API (/v1/models, /v1/chat/completions with streaming),
// so it is also a proof that the API is enough for a real client. Everything the model writes is put into the page
// as text (textContent), never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const BOX_SPAN = /<\|begin_of_box\|>([\s\S]*?)<\|end_of_box\|>/g;
  const QUAD = /\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]/g;
  const SETTINGS = ["max-tokens", "thinking", "thinking-budget", "temperature", "api-key"];

  const state = {
    history: [],      // OpenAI-format messages sent so far (assistant turns keep only their answer)
    attachments: [],  // {kind: "image"|"video"|"pdf", name, url (data: URL)}
    controller: null, // AbortController of the request in flight
    model: null,
  };

  // ---- settings (kept in localStorage so a reload keeps them) ----
  function loadSettings() {
    for (const id of SETTINGS) {
      const v = localStorage.getItem("glm4v_ms." + id);
      if (v === null) continue;
      const el = $(id);
      if (el.type === "checkbox") el.checked = v === "1"; else el.value = v;
    }
  }
  function saveSettings() {
    for (const id of SETTINGS) {
      const el = $(id);
      localStorage.setItem("glm4v_ms." + id, el.type === "checkbox" ? (el.checked ? "1" : "0") : el.value);
    }
  }
  function numberOrNull(id) {
    const v = $(id).value.trim();
    return v === "" ? null : Number(v);
  }
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // ---- errors ----
  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }
  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }
  async function errorMessage(response) {
    let text = "";
    try { text = await response.text(); } catch (e) { /* body unreadable */ }
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return `HTTP ${response.status}${text ? ": " + text.slice(0, 300) : ""}`;
  }

  // ---- attachments: picker, drag and drop, paste ----
  // Documents: PDFs and office files (LibreOffice on the server renders them to pages, as the CLI's --doc does).
  const DOCUMENT_EXT = [".pdf", ".ppt", ".pptx", ".doc", ".docx", ".odp", ".odt"];
  function kindOf(file) {
    const type = (file.type || "").toLowerCase();
    const name = (file.name || "").toLowerCase();
    if (type === "application/pdf" || DOCUMENT_EXT.some((ext) => name.endsWith(ext))) return "pdf";
    if (type.startsWith("image/")) return "image";
    if (type.startsWith("video/")) return "video";
    return null;
  }
  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(new Error(`could not read ${file.name}`));
      r.readAsDataURL(file);
    });
  }
  async function addFiles(files) {
    clearError();
    for (const file of files) {
      const kind = kindOf(file);
      if (!kind) {
        showError(`${file.name || "pasted item"}: not an image, a video, a PDF or an office document`);
        continue;
      }
      if (kind !== "image" && state.attachments.some((a) => a.kind === kind)) {
        showError(`${file.name}: one ${kind === "pdf" ? "document" : "video"} per message; remove the other one first`);
        continue;
      }
      try {
        state.attachments.push({ kind, name: file.name || `pasted.${kind === "image" ? "png" : kind}`,
                                 url: await readAsDataURL(file) });
      } catch (e) {
        showError(e.message);
      }
    }
    renderAttachments();
  }
  function renderAttachments() {
    const box = $("attachments");
    box.replaceChildren();
    state.attachments.forEach((a, i) => {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.dataset.kind = a.kind;
      if (a.kind === "image") {
        const img = document.createElement("img");
        img.src = a.url;
        img.alt = "";
        chip.append(img);
      }
      chip.append(document.createTextNode(`${a.kind === "pdf" ? "document" : a.kind}: ${a.name}`));
      const rm = document.createElement("button");
      rm.type = "button";
      rm.title = "remove";
      rm.textContent = "✕";
      rm.addEventListener("click", () => { state.attachments.splice(i, 1); renderAttachments(); });
      chip.append(rm);
      box.append(chip);
    });
    $("pdf-pages-row").hidden = !state.attachments.some((a) => a.kind === "pdf");
  }

  // ---- the request ----
  function userContent(text) {
    const parts = [];
    for (const a of state.attachments) {
      if (a.kind === "image") parts.push({ type: "image_url", image_url: { url: a.url } });
      else if (a.kind === "video") parts.push({ type: "video_url", video_url: { url: a.url } });
      else {
        const file = { file_data: a.url, filename: a.name };
        const pages = $("pdf-pages").value.trim();
        if (pages) file.pages = pages;
        parts.push({ type: "file", file });
      }
    }
    if (text) parts.push({ type: "text", text });
    return parts;
  }
  function requestBody(messages) {
    const body = {
      model: state.model || undefined,
      messages,
      stream: true,
      stream_options: { include_usage: true },
    };
    const maxTokens = numberOrNull("max-tokens");
    if (maxTokens) body.max_tokens = maxTokens;
    const temperature = numberOrNull("temperature");
    if (temperature !== null) body.temperature = temperature;
    const thinking = $("thinking").checked;
    body.chat_template_kwargs = { enable_thinking: thinking };
    const budget = numberOrNull("thinking-budget");
    if (thinking && budget) body.thinking_budget = budget;
    return body;
  }
  function firstImage(messages) {
    // The boxes refer to the first image of the conversation, as the CLI draws them on its first image.
    for (const m of messages) {
      if (!Array.isArray(m.content)) continue;
      for (const p of m.content) if (p.type === "image_url") return p.image_url.url;
    }
    return null;
  }

  // ---- rendering (text only; never innerHTML with model output) ----
  function renderText(el, text) {
    // ``` fences become code blocks; everything else stays plain text. Box spans are shown as [box N].
    let n = 0;
    const shown = text.replace(BOX_SPAN, () => `[box ${++n}]`);
    el.replaceChildren();
    shown.split("```").forEach((seg, i) => {
      if (i % 2 === 1) {
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        const nl = seg.indexOf("\n");
        const lang = nl > 0 ? seg.slice(0, nl).trim() : "";
        if (lang && /^[\w+#.-]+$/.test(lang)) {
          code.dataset.lang = lang;
          seg = seg.slice(nl + 1);
        }
        code.textContent = seg.replace(/\n$/, "");
        pre.append(code);
        el.append(pre);
      } else if (seg) {
        const span = document.createElement("span");
        span.className = "text";
        span.textContent = seg;
        el.append(span);
      }
    });
  }
  function boxesOf(text) {
    // [{x1, y1, x2, y2, label}] in 0-1000 coordinates; the label is the phrase just before the span.
    // (matchAll works on a copy of the regex: no shared lastIndex between the loops.)
    const out = [];
    for (const m of text.matchAll(BOX_SPAN)) {
      const before = text.slice(0, m.index).replaceAll(BOX_SPAN, "");
      const phrase = before.split(/[\n.;:!?]/).pop().trim().slice(-40);
      for (const q of m[1].matchAll(QUAD)) {
        const [x1, y1, x2, y2] = q.slice(1, 5).map(Number);
        out.push({ x1, y1, x2, y2, label: `${out.length + 1}${phrase ? " " + phrase : ""}` });
      }
    }
    return out;
  }
  function drawBoxes(msgEl, imageUrl, boxes) {
    const clamp = (v) => Math.min(Math.max(v, 0), 1000) / 10;  // 0-1000 -> percent of the image
    const fig = document.createElement("div");
    fig.className = "figure";
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "the image the boxes refer to";
    fig.append(img);
    for (const b of boxes) {
      const left = clamp(Math.min(b.x1, b.x2)), top = clamp(Math.min(b.y1, b.y2));
      const div = document.createElement("div");
      div.className = "box";
      div.style.left = left + "%";
      div.style.top = top + "%";
      div.style.width = clamp(Math.max(b.x1, b.x2)) - left + "%";
      div.style.height = clamp(Math.max(b.y1, b.y2)) - top + "%";
      div.dataset.coords = [b.x1, b.y1, b.x2, b.y2].join(",");
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = b.label;
      div.append(label);
      fig.append(div);
    }
    msgEl.append(fig);
  }
  function addUserMessage(text, attachments) {
    const el = document.createElement("div");
    el.className = "msg user";
    if (attachments.length) {
      const thumbs = document.createElement("div");
      thumbs.className = "thumbs";
      for (const a of attachments) {
        if (a.kind === "image") {
          const img = document.createElement("img");
          img.src = a.url;
          img.alt = a.name;
          thumbs.append(img);
        } else {
          const chip = document.createElement("span");
          chip.className = "chip";
          chip.textContent = `${a.kind === "pdf" ? "document" : a.kind}: ${a.name}` + (a.kind === "pdf" && $("pdf-pages").value.trim()
            ? ` (pages ${$("pdf-pages").value.trim()})` : "");
          thumbs.append(chip);
        }
      }
      el.append(thumbs);
    }
    const body = document.createElement("div");
    renderText(body, text);
    el.append(body);
    $("log").append(el);
    return el;
  }
  function addAssistantMessage() {
    const el = document.createElement("div");
    el.className = "msg assistant";
    el.dataset.status = "streaming";
    const details = document.createElement("details");
    details.className = "thinking";
    details.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const thinking = document.createElement("div");
    thinking.className = "body";
    details.append(summary, thinking);
    const answer = document.createElement("div");
    answer.className = "answer";
    const meta = document.createElement("div");
    meta.className = "meta muted";
    el.append(details, answer, meta);
    $("log").append(el);
    return { el, details, thinking, answer, meta };
  }

  // ---- streaming ----
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  async function send() {
    const text = $("prompt").value.trim();
    if (state.controller) return;
    if (!text && !state.attachments.length) return;
    clearError();
    saveSettings();
    const attachments = state.attachments.slice();
    const userMsg = { role: "user", content: userContent(text) };
    const messages = state.history.concat([userMsg]);
    const userEl = addUserMessage(text, attachments);
    const out = addAssistantMessage();
    out.el.scrollIntoView({ block: "end" });
    state.attachments = [];
    renderAttachments();
    $("prompt").value = "";
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    let thinking = "", answer = "", finish = null, usage = null, failure = null;
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: controller.signal,
      });
      if (!response.ok) {
        failure = await errorMessage(response);
      } else {
        for await (const data of sseEvents(response)) {
          if (data === "[DONE]") break;
          const chunk = JSON.parse(data);
          if (chunk.error) { failure = chunk.error.message || "the server stopped the answer"; break; }
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const delta = choice.delta || {};
            const reasoning = delta.reasoning_content ?? delta.reasoning;  // servers send one or both
            if (reasoning) {
              thinking += reasoning;
              out.details.hidden = false;
              out.thinking.textContent = thinking;
            }
            if (delta.content) {
              answer += delta.content;
              renderText(out.answer, answer);
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") failure = `connection failed: ${e.message}`;
    }
    const stopped = controller.signal.aborted;
    state.controller = null;
    setBusy(false);

    if (failure) {
      out.el.dataset.status = "error";
      out.el.classList.add("error");
      const err = document.createElement("div");
      err.className = "error-text";
      err.textContent = failure;
      out.el.append(err);
      showError(failure);
      // The failed turn is not part of the conversation: the next message is sent without it.
      userEl.classList.add("failed");
      return;
    }
    out.el.dataset.status = stopped ? "stopped" : "done";
    out.el.dataset.finish = finish || "";
    const notes = [];
    if (stopped) notes.push("stopped");
    if (finish === "length") notes.push("cut at max tokens");
    if (usage) notes.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} new tokens`);
    out.meta.textContent = notes.join(" · ");
    state.history.push(userMsg, { role: "assistant", content: answer });
    const boxes = boxesOf(answer);
    const image = firstImage(state.history);
    if (boxes.length && image) drawBoxes(out.el, image, boxes);
  }

  // ---- wiring ----
  async function loadModel() {
    try {
      const r = await fetch("v1/models", { headers: headers() });
      if (!r.ok) { $("model-name").textContent = await errorMessage(r); return; }
      const body = await r.json();
      state.model = body.data && body.data.length ? body.data[0].id : null;
      $("model-name").textContent = state.model || "no model";
    } catch (e) {
      $("model-name").textContent = "server unreachable";
    }
  }

  loadSettings();
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("file").addEventListener("change", (e) => { addFiles(Array.from(e.target.files)); e.target.value = ""; });
  $("settings-toggle").addEventListener("click", () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!s.hidden));
  });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("log").replaceChildren();
    clearError();
  });
  for (const id of SETTINGS) $(id).addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", loadModel);
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", (e) => {
    if (e.target === document.documentElement || !e.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles(Array.from(e.dataTransfer.files));
  });
  document.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  loadModel();
})();
