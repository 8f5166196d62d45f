// The playground: asks for the server's token once (kept for this tab only), then classifies or
// generates. No build step, no CDN: this file is all there is.
"use strict";
let info = null;
let lastPrediction = null;
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem("slimtune-token");
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

async function call(path, body) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const response = await fetch(path, body === undefined ? { headers: headers() }
      : { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (response.status !== 401) return response;
    const token = window.prompt("This server needs its token:");
    if (token === null) break;
    sessionStorage.setItem("slimtune-token", token.trim());
  }
  throw new Error("not authorised: the server wants its bearer token");
}

async function failure(response) {
  try { return (await response.json()).error || response.statusText; } catch (e) { return response.statusText; }
}

function showProbabilities(prediction) {
  const result = $("result");
  result.replaceChildren();
  const entries = Object.entries(prediction.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of entries) {
    const row = document.createElement("div");
    row.className = "bar-row" + (label === prediction.label ? " top" : "");
    row.dataset.label = label;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * p).toFixed(1) + "%";
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = (100 * p).toFixed(1) + "%";
    row.append(name, bar, value);
    result.append(row);
  }
  $("feedback").hidden = false;
  $("feedback-status").textContent = "";
}

async function classify(text, pair) {
  const body = info.paired ? { pairs: [[text, pair]] } : { texts: [text] };
  const response = await call("/v1/classify", body);
  if (!response.ok) throw new Error(await failure(response));
  const answer = await response.json();
  lastPrediction = { text, pair, label: answer.predictions[0].label, version: answer.model_version };
  showProbabilities(answer.predictions[0]);
}

async function generate(prompt) {
  const body = { prompt, max_new_tokens: Number($("max-new").value), temperature: Number($("temperature").value) };
  const response = await call("/v1/generate", body);
  if (!response.ok) throw new Error(await failure(response));
  const out = document.createElement("div");
  out.id = "generated";
  $("result").replaceChildren(out);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const kind = (event.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((event.match(/^data: (.*)$/m) || [])[1] || "{}");
      if (kind === "token") out.textContent += data.text;
      if (kind === "error") throw new Error(data.error);
      if (kind === "done") out.dataset.done = "true";
    }
  }
}

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  $("go").disabled = true;
  try {
    if (info.kind === "generate") await generate($("text").value);
    else await classify($("text").value, $("pair").value);
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    $("go").disabled = false;
  }
});

$("send-feedback").addEventListener("click", async () => {
  if (!lastPrediction) return;
  const body = { text: lastPrediction.text, label: $("correct").value, predicted: lastPrediction.label,
                 model_version: lastPrediction.version };
  if (info.paired) body.pair = lastPrediction.pair;
  const response = await call("/v1/feedback", body);
  $("feedback-status").textContent = response.ok ? "thank you: stored" : await failure(response);
});

(async () => {
  try {
    const response = await call("/v1/info");
    if (!response.ok) throw new Error(await failure(response));
    info = await response.json();
    $("model").textContent = `${info.kind === "generate" ? "text generation" : "classification"} · ` +
      `${info.model_version} · ${info.runtime}`;
    if (info.kind === "generate") {
      $("text-label").textContent = "Prompt";
      $("go").textContent = "Generate";
      $("gen-options").hidden = false;
    }
    $("pair-box").hidden = !info.paired;
    for (const label of info.labels) {
      const option = document.createElement("option");
      option.value = option.textContent = label;
      $("correct").append(option);
    }
  } catch (e) {
    $("error").textContent = e.message;
  }
})();
