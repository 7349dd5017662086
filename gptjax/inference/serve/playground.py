"""The page at GET /: a prompt, the sampling controls, and the completion streamed into the page as it
comes. One HTML document with its own script and style, so it needs nothing from outside the server."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gptjax serve</title>
<style>
body { font: 15px system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
textarea, pre { width: 100%; box-sizing: border-box; font: 14px ui-monospace, monospace; }
pre { white-space: pre-wrap; background: #f4f4f4; padding: .8rem; min-height: 6rem; }
label { margin-right: 1rem; } input[type=number] { width: 5rem; } .err { color: #a00; }
</style></head><body>
<h1>gptjax serve: <span id="model"></span></h1>
<textarea id="prompt" rows="6" placeholder="a prompt"></textarea>
<p><label>max_tokens <input id="max_tokens" type="number" value="64" min="1"></label>
<label>temperature <input id="temperature" type="number" value="0.8" min="0" step="0.1"></label>
<label>top_k <input id="top_k" type="number" value="200" min="0"></label>
<label>top_p <input id="top_p" type="number" value="1" min="0" max="1" step="0.05"></label>
<label>seed <input id="seed" type="number" value="0" min="0"></label></p>
<p><label>API key <input id="key" type="password"></label> <button id="go">Complete</button>
<button id="stop" disabled>Stop</button></p>
<pre id="out"></pre>
<script>
const $ = (id) => document.getElementById(id);
let controller = null;
const headers = () => Object.assign({"Content-Type": "application/json"},
  $("key").value ? {"Authorization": "Bearer " + $("key").value} : {});
fetch("v1/models", {headers: headers()}).then(r => r.json()).then(j => { $("model").textContent = j.data[0].id; })
  .catch(() => {});
$("stop").onclick = () => controller && controller.abort();
$("go").onclick = async () => {
  const body = {prompt: $("prompt").value, stream: true};
  for (const k of ["max_tokens", "top_k", "seed"]) body[k] = parseInt($(k).value, 10);
  for (const k of ["temperature", "top_p"]) body[k] = parseFloat($(k).value);
  const out = $("out");
  out.textContent = body.prompt; out.className = ""; out.dataset.state = "streaming";
  controller = new AbortController(); $("go").disabled = true; $("stop").disabled = false;
  try {
    const r = await fetch("v1/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
                                             signal: controller.signal});
    if (!r.ok) { out.textContent = (await r.json()).error.message; out.className = "err"; return; }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\\n\\n"); buffer = events.pop();
      for (const e of events) {
        const data = e.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        for (const c of JSON.parse(data).choices) out.textContent += c.text;
      }
    }
  } catch (e) { if (e.name !== "AbortError") { out.textContent += "\\n" + e; out.className = "err"; } }
  finally { $("go").disabled = false; $("stop").disabled = true; controller = null; out.dataset.state = "done"; }
};
</script></body></html>
"""
