// The chat page: a client of the gateway's own /v1/chat/completions (stream: true, read as SSE).
// No framework, no build step. The conversation lives in `turns`; the page is drawn from it.
"use strict";
const $ = (id) => document.getElementById(id);
const MAX_FILE_BYTES = 20 * 2 ** 20;   // the gateway's limit for one image
const MAX_IMAGES = 8;                  // per conversation (the model's limit)
const IMAGE_SIDE = 224;                // the server squares images to 224 x 224
const turns = [];                      // {role, text, images: [dataURL]} ; assistant: + meta
let pending = [];                      // data URLs of the images for the next message
let controller = null;                 // the running request's AbortController
let lastRequest = null;                // what Retry / Regenerate send again

function apiKey() { return sessionStorage.getItem("minigpt5-api-key") || ""; }
function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

function notice(text, retry) {
  $("notice").hidden = !text;
  $("notice-text").textContent = text || "";
  $("retry").hidden = !retry;
}

// ---- models and the API key ----------------------------------------------------------------------
async function loadModels() {
  let response;
  try { response = await fetch("v1/models", { headers: headers() }); }
  catch (e) { notice("The gateway cannot be reached: " + e.message, false); return; }
  if (response.status === 401) { $("key-form").hidden = false; $("api-key").focus(); return; }
  $("key-form").hidden = true;
  if (!response.ok) return;
  const names = (await response.json()).data.map((m) => m.id);
  const select = $("model");
  select.replaceChildren(...names.map((name) => new Option(name, name)));
}
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("minigpt5-api-key", $("api-key").value.trim());
  $("api-key").value = "";
  loadModels();
});

// ---- images in: picker, drop, paste; checked and resized here -----------------------------------
async function addFiles(files) {
  const problems = [];
  for (const file of files) {
    if (!file.type.startsWith("image/")) { problems.push(`${file.name} is not an image (${file.type || "unknown type"})`); continue; }
    if (file.size > MAX_FILE_BYTES) { problems.push(`${file.name} is too large (${(file.size / 2 ** 20).toFixed(1)} MiB; at most 20 MiB)`); continue; }
    if (imagesInConversation() + pending.length >= MAX_IMAGES) { problems.push(`${file.name}: at most ${MAX_IMAGES} images per conversation`); continue; }
    try { pending.push(await resized(file)); }
    catch (e) { problems.push(`${file.name} could not be read as an image`); }
  }
  drawPreviews();
  notice(problems.join(". "), false);
}

// The shorter side down to 224 (what the server keeps, padded or cropped), on white, as JPEG.
async function resized(file) {
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, IMAGE_SIDE / Math.min(bitmap.width, bitmap.height), 2048 / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return canvas.toDataURL("image/jpeg", 0.92);
}

function imagesInConversation() { return turns.reduce((n, t) => n + t.images.length, 0); }

function drawPreviews() {
  $("previews").replaceChildren(...pending.map((url, i) => {
    const box = document.createElement("div");
    box.className = "preview";
    const img = new Image();
    img.src = url; img.alt = `image ${i + 1} to send`;
    const remove = document.createElement("button");
    remove.type = "button"; remove.textContent = "×"; remove.setAttribute("aria-label", `remove image ${i + 1}`);
    remove.onclick = () => { pending.splice(i, 1); drawPreviews(); };
    box.append(img, remove);
    return box;
  }));
}

$("files").addEventListener("change", (event) => { addFiles([...event.target.files]); event.target.value = ""; });
document.addEventListener("paste", (event) => {
  const files = [...event.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile());
  if (files.length) { event.preventDefault(); addFiles(files); }
});
document.addEventListener("dragover", (event) => { event.preventDefault(); $("drop-hint").hidden = false; });
document.addEventListener("dragleave", (event) => { if (!event.relatedTarget) $("drop-hint").hidden = true; });
document.addEventListener("drop", (event) => {
  event.preventDefault(); $("drop-hint").hidden = true;
  addFiles([...event.dataTransfer.files]);
});

// ---- the conversation on the page ----------------------------------------------------------------
function turnElement(role) {
  const box = document.createElement("section");
  box.className = "turn " + role;
  const who = document.createElement("div");
  who.className = "who"; who.textContent = role === "user" ? "You" : "MiniGPT-5";
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("div");
  meta.className = "meta";
  box.append(who, body, meta);
  $("log").append(box);
  return { box, body, meta };
}

function showUser(turn) {
  const { body } = turnElement("user");
  const thumbs = document.createElement("div");
  thumbs.className = "thumbs";
  thumbs.append(...turn.images.map((url) => Object.assign(new Image(), { src: url, alt: "your image" })));
  body.append(thumbs, document.createTextNode(turn.text));
}

function generatedImage(url, number) {
  const img = new Image();
  img.src = url; img.alt = `generated image ${number}`; img.className = "generated"; img.tabIndex = 0;
  const open = () => { $("viewer-img").src = url; $("viewer-save").href = url;
    $("viewer-save").download = `minigpt5-image-${number}.png`; $("viewer").showModal(); };
  img.onclick = open;
  img.onkeydown = (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); open(); } };
  return img;
}
$("viewer-close").onclick = () => $("viewer").close();

// ---- one answer: fetch + SSE ---------------------------------------------------------------------
function requestBody(messages) {
  const body = { model: $("model").value || "minigpt5", messages, stream: true, stream_options: { include_usage: true } };
  const number = (id) => $(id).value === "" ? undefined : Number($(id).value);
  if ($("force-image").checked) body.force_image = true;
  body.guidance_scale = number("guidance");
  body.num_inference_steps = number("steps");
  body.max_tokens = number("max-tokens");
  body.seed = number("seed") ?? Math.floor(Math.random() * 2 ** 31);  // shown under the answer
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  return JSON.parse(JSON.stringify(body));  // drops the unset ones
}

function apiMessages() {
  return turns.map((t) => t.role === "user"
    ? { role: "user", content: [{ type: "text", text: t.text },
        ...t.images.map((url) => ({ type: "image_url", image_url: { url } }))] }
    : { role: "assistant", content: t.text,
        images: t.images.map((url, i) => ({ type: "image_url", image_url: { url }, offset: t.offsets[i] })) });
}

async function ask() {
  const body = requestBody(apiMessages());
  lastRequest = body;
  notice("", false);
  setBusy(true);
  const view = turnElement("assistant");
  const answer = { role: "assistant", text: "", images: [], offsets: [], seed: body.seed, view };
  let textNode = view.body.appendChild(document.createTextNode(""));
  const placeholders = [];
  let outcome = "incomplete";
  controller = new AbortController();
  try {
    const response = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                          signal: controller.signal });
    if (!response.ok) {
      view.box.remove();
      return refused(response);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end); buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") { outcome = "done"; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) answer.usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.finish_reason) answer.finish = choice.finish_reason;
        const delta = choice.delta || {};
        if (delta.content) { answer.text += delta.content; textNode.appendData(delta.content); }
        if (delta.image_start) {  // the model began an image: hold its place, count the seconds
          const box = document.createElement("div");
          box.className = "placeholder"; box.setAttribute("role", "status");
          const started = Date.now();
          const tick = () => { box.textContent = `Drawing image ${delta.image_start.index}… ${Math.floor((Date.now() - started) / 1000)} s`; };
          tick();
          placeholders.push({ box, timer: setInterval(tick, 1000) });
          view.body.append(box);
          textNode = view.body.appendChild(document.createTextNode(""));
        }
        for (const image of delta.images || []) {
          answer.images.push(image.image_url.url); answer.offsets.push(image.offset);
          const img = generatedImage(image.image_url.url, answer.images.length);
          const slot = placeholders.shift();
          if (slot) { clearInterval(slot.timer); slot.box.replaceWith(img); }
          else { view.body.append(img); textNode = view.body.appendChild(document.createTextNode("")); }
        }
      }
    }
    if (outcome !== "done") throw new Error("the connection closed before the answer ended");
  } catch (error) {
    if (error.name === "AbortError") outcome = "stopped";
    else { outcome = "failed"; notice(`Connection lost or the answer failed: ${error.message}. What arrived is kept.`, true); }
  } finally {
    controller = null;
    setBusy(false);
  }
  for (const slot of placeholders) { clearInterval(slot.timer); slot.box.textContent = "image not finished"; }
  turns.push(answer);
  showMeta(answer, outcome);
  $("regenerate").hidden = false;
}

function showMeta(answer, outcome) {
  const parts = [];
  const u = answer.usage;
  if (u) parts.push(`${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens`);
  parts.push(`seed ${answer.seed}`);
  if (answer.finish) parts.push(`finish: ${answer.finish}`);
  if (u && u.cost_usd != null) parts.push(`$${u.cost_usd}`);
  if (outcome === "stopped") parts.push("stopped");
  if (outcome === "failed") parts.push("incomplete");
  answer.view.meta.textContent = parts.join(" · ");
  answer.view.meta.className = "meta " + (outcome === "done" ? "" : outcome === "stopped" ? "stopped" : "failed");
}

async function refused(response) {
  let message = `HTTP ${response.status}`;
  try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
  if (response.status === 401) { $("key-form").hidden = false; $("api-key").focus(); notice("API key needed: " + message, false); }
  else if (response.status === 503) notice("The server is busy: " + message, true);
  else if (response.status >= 500) notice("The server failed: " + message, true);
  else notice("The request was refused: " + message, false);
  if (response.status !== 503 && response.status < 500) {
    // bad input: give the message back to the composer so nothing typed is lost
    const user = turns.pop();
    if (user && user.role === "user") { $("log").lastElementChild.remove(); $("prompt").value = user.text; pending = user.images; drawPreviews(); }
  }
}

function setBusy(busy) {
  $("send").disabled = busy; $("stop").hidden = !busy; $("regenerate").disabled = busy;
  if (busy) $("stop").focus(); else $("prompt").focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (controller) return;
  if (!text) { notice("Write a message (images alone are not enough: the model answers text).", false); return; }
  const turn = { role: "user", text, images: pending };
  turns.push(turn); showUser(turn);
  pending = []; drawPreviews(); $("prompt").value = "";
  ask();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); $("composer").requestSubmit(); }
});
document.addEventListener("keydown", (event) => { if (event.key === "Escape" && controller) controller.abort(); });
$("stop").onclick = () => controller && controller.abort();
$("retry").onclick = () => { notice("", false); if (turns.length && turns[turns.length - 1].role === "assistant") regenerate(); else ask(); };
$("regenerate").onclick = () => regenerate();
function regenerate() {
  if (controller || !turns.length) return;
  const last = turns[turns.length - 1];
  if (last.role === "assistant") { turns.pop(); last.view.box.remove(); }
  ask();
}

// ---- downloads ---------------------------------------------------------------------------------
function escapeHtml(text) { return text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }
function save(name, type, text) {
  const link = Object.assign(document.createElement("a"), { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  link.click(); setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}
$("download-md").onclick = () => save("conversation.md", "text/markdown", turns.map((t) =>
  `**${t.role === "user" ? "You" : "MiniGPT-5"}:**\n\n${t.text}\n\n` + t.images.map((url, i) => `![image ${i + 1}](${url})\n\n`).join("")).join(""));
$("download-html").onclick = () => save("conversation.html", "text/html", "<!doctype html><meta charset=utf-8><title>MiniGPT-5 conversation</title>\n" +
  turns.map((t) => `<h3>${t.role === "user" ? "You" : "MiniGPT-5"}</h3><p style="white-space:pre-wrap">${escapeHtml(t.text)}</p>` +
    t.images.map((url) => `<img src="${url}" style="max-width:100%">`).join("")).join("\n"));

loadModels();
$("prompt").focus();
