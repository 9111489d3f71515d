// ccj-serve's page: text -> images (GET /search), image -> images or texts (POST /search/image).
// Plain JavaScript, no build step, nothing loaded from outside this server.
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function k() {
  const v = parseInt($("k").value, 10);
  return Number.isFinite(v) ? v : 12;
}

async function call(url, options) {
  const res = await fetch(url, options);
  let body;
  try { body = await res.json(); } catch (e) { body = { error: res.status + " " + res.statusText }; }
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function show(answer, what) {
  const list = $("results");
  list.replaceChildren();
  for (const hit of answer.hits) {
    const li = document.createElement("li");
    li.dataset.id = String(hit.id);
    li.dataset.score = String(hit.score);
    const cap = document.createElement("div");
    cap.className = "cap";
    const id = document.createElement("span");
    id.className = "id";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(4);
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.src = hit.thumbnail;
      img.alt = String(hit.id);
      img.loading = "lazy";
      const a = document.createElement("a");
      a.href = hit.image;
      a.target = "_blank";
      a.append(img);
      li.append(a);
      id.textContent = String(hit.id);
      id.title = String(hit.id);
    } else {
      li.className = "text";
      id.textContent = hit.text == null ? String(hit.id) : hit.text + "  (" + hit.id + ")";
    }
    cap.append(id, score);
    li.append(cap);
    list.append(li);
  }
  let note = what + "：" + answer.hits.length + " 个结果（k=" + answer.k + "，索引 " + answer.index.type +
    "，" + answer.index.rows + " 条）";
  if (answer.query && answer.query.truncated) note += "；查询过长，只用了前 " + info.context_length + " 个词元";
  setStatus(note, false);
}

async function searchText(ev) {
  ev.preventDefault();
  const q = $("q").value;
  $("results").replaceChildren();
  setStatus("搜索中…", false);
  try {
    const answer = q.length > 1000  // a long query goes in a body: URLs have length limits
      ? await call("/search", { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify({ q: q, k: k() }) })
      : await call("/search?q=" + encodeURIComponent(q) + "&k=" + k());
    show(answer, "以文搜图");
  } catch (e) {
    $("results").replaceChildren();
    setStatus("错误：" + e.message, true);
  }
}

async function searchImage(file) {
  if (!file) return;
  const target = $("target-texts").checked ? "texts" : "images";
  $("results").replaceChildren();
  setStatus("上传 " + file.name + "…", false);
  try {
    const answer = await call("/search/image?k=" + k() + "&target=" + target, {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    show(answer, target === "texts" ? "以图搜文" : "以图搜图");
  } catch (e) {
    $("results").replaceChildren();
    setStatus("错误：" + e.message, true);
  }
}

function wireDrop() {
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    searchImage(ev.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (ev) => searchImage(ev.target.files[0]));
}

async function start() {
  $("search").addEventListener("submit", searchText);
  wireDrop();
  try {
    info = await call("/healthz");
    const images = info.runs.images ? info.runs.images.rows : 0;
    $("model").textContent = "模型：" + info.model + " · 图片 " + images + " 张" +
      (info.runs.texts ? " · 文本 " + info.runs.texts.rows + " 条" : "");
    $("k").max = String(Math.max(images, info.runs.texts ? info.runs.texts.rows : 0));
    if (images && k() > images) $("k").value = String(images);
    $("target-label").hidden = !info.runs.texts;
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus("服务不可用：" + e.message, true);
  }
}
start();
