// The page's icons as inline SVG drawn with currentColor: they show wherever the page does, with
// or without an emoji font, in either theme. Each button that holds one names itself (aria-label).
"use strict";

const ICON_PATHS = {
  thumbsUp: "M7 10v11M15 5.9 14 10h5.8a2 2 0 0 1 2 2.3l-1.4 7A2 2 0 0 1 18.4 21H7V10l4-8a3 3 0 0 1 4 3.9z",
  thumbsDown: "M17 14V3M9 18.1 10 14H4.2a2 2 0 0 1-2-2.3l1.4-7A2 2 0 0 1 5.6 3H17v11l-4 8a3 3 0 0 1-4-3.9z",
  copy: "M9 9h11v11H9zM5 15H4V4h11v1",
  regenerate: "M21 12a9 9 0 1 1-3-6.7L21 8M21 3v5h-5",
  check: "M20 6 9 17l-5-5",
};

function icon(name) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  for (const [k, v] of Object.entries({
    viewBox: "0 0 24 24", width: "16", height: "16", "aria-hidden": "true", focusable: "false",
    fill: "none", stroke: "currentColor", "stroke-width": "2", "stroke-linecap": "round",
    "stroke-linejoin": "round",
  })) svg.setAttribute(k, v);
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", ICON_PATHS[name]);
  svg.append(path);
  return svg;
}
