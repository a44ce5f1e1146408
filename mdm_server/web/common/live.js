// Server-Sent Events over fetch: EventSource cannot send the Authorization header,
// and the token must never go in a URL. `openStream(path, onEvent)` reads the
// stream and calls onEvent(name, data) for each event (data parsed as JSON);
// returns {stop, done}: stop() aborts it, done resolves (or rejects with the
// API's error) when it ends.

import { apiFetch } from "./api.js";

export function openStream(path, onEvent) {
  const ctrl = new AbortController();
  const done = (async () => {
    const resp = await apiFetch(path, { signal: ctrl.signal,
                                        headers: { Accept: "text/event-stream" } });
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (err && err.name === "AbortError") return;
        throw err;
      }
      if (chunk.done) return;
      buf += decoder.decode(chunk.value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data.push(line.slice(6));
        }
        if (data.length) onEvent(name, JSON.parse(data.join("\n")));
      }
    }
  })().catch((err) => {
    if (err && err.name === "AbortError") return;
    throw err;
  });
  return { stop: () => ctrl.abort(), done };
}
