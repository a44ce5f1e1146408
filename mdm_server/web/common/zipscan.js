// Which entries of a ZIP have gone by, while its bytes are still streaming in.
//
// A streamed ZIP writes each entry as a local file header (signature PK\x03\x04,
// then the entry's name) followed by its data; when the next header shows up, the
// entry before it is complete. That is all a progress bar needs to know, and it
// takes no unzipping. Headers may be cut across chunks: the last few bytes of each
// chunk are kept and scanned again with the next one (each header counted once, by
// its absolute offset).

const SIG = [0x50, 0x4b, 0x03, 0x04];
const HEADER = 30; // fixed part of a local file header
const NAME_OK = /^[A-Za-z0-9_./-]{1,255}$/;

export class ZipScan {
  constructor() {
    this.bytes = 0;        // bytes seen so far
    this.names = [];       // entries begun, in order
    this._tail = new Uint8Array(0);
    this._last = -1;       // absolute offset of the last header counted
    this._decoder = new TextDecoder();
  }

  /** Feed the next chunk (a Uint8Array); returns the names of entries begun in it. */
  push(chunk) {
    const buf = new Uint8Array(this._tail.length + chunk.length);
    buf.set(this._tail);
    buf.set(chunk, this._tail.length);
    const base = this.bytes - this._tail.length;
    this.bytes += chunk.length;
    const found = [];
    let keepFrom = Math.max(0, buf.length - (HEADER - 1));
    for (let i = 0; i + HEADER <= buf.length; i++) {
      if (buf[i] !== SIG[0] || buf[i + 1] !== SIG[1] || buf[i + 2] !== SIG[2] ||
          buf[i + 3] !== SIG[3]) continue;
      const at = base + i;
      if (at <= this._last) continue;
      const nameLen = buf[i + 26] | (buf[i + 27] << 8);
      if (nameLen === 0 || nameLen > 255) continue;
      if (i + HEADER + nameLen > buf.length) {
        keepFrom = Math.min(keepFrom, i); // the name is in the next chunk
        break;
      }
      const name = this._decoder.decode(buf.subarray(i + HEADER, i + HEADER + nameLen));
      if (!NAME_OK.test(name)) continue; // compressed bytes that look like a signature
      this._last = at;
      this.names.push(name);
      found.push(name);
    }
    this._tail = buf.slice(keepFrom);
    return found;
  }

  /** Entries known to be complete: every one begun except the last (all at the end). */
  finished(atEnd = false) {
    return atEnd ? this.names.slice() : this.names.slice(0, -1);
  }
}
