// Token display, the same rules as kronscope.web.templating.visible_token: spaces at the
// edges as '·', newline '↵', tab '⇥', carriage return '\r', other control and invisible
// format characters as \xNN / \uNNNN. Always rendered with textContent.

const VISIBLE = { "\n": "↵", "\t": "⇥", "\r": "\\r" };
const INVISIBLE = /^[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]$/u;
export const SHADE_LEVELS = 10;

export function visibleToken(token) {
  let out = "";
  for (const ch of String(token)) {
    if (ch in VISIBLE) {
      out += VISIBLE[ch];
    } else if (INVISIBLE.test(ch)) {
      const code = ch.codePointAt(0);
      out += code <= 0xff ? "\\x" + code.toString(16).padStart(2, "0") : "\\u" + code.toString(16).padStart(4, "0");
    } else {
      out += ch;
    }
  }
  const stripped = out.replace(/^ +/, "").replace(/ +$/, "");
  if (!stripped) return "·".repeat(out.length);
  const lead = out.length - out.replace(/^ +/, "").length;
  const trail = out.length - out.replace(/ +$/, "").length;
  return "·".repeat(lead) + stripped + "·".repeat(trail);
}

// Shading level 0..10 of value on a scale whose maximum is top (0: not active).
export function shade(value, top) {
  if (!(value > 0) || !(top > 0) || !Number.isFinite(value) || !Number.isFinite(top)) return 0;
  return Math.max(1, Math.min(SHADE_LEVELS, Math.ceil((SHADE_LEVELS * value) / top)));
}

export function setShade(node, level) {
  for (let l = 0; l <= SHADE_LEVELS; l++) node.classList.remove("s" + l);
  node.classList.add("s" + level);
}
