// The Deep Zoom viewer: pans and zooms a finished picture on a canvas, drawing only the tiles
// of its pyramid (N_files/LEVEL/COL_ROW.png, as assemble/dzi.rs writes them) that cover the
// view, at the level that matches the zoom, so a 32768² picture is never loaded whole. Lower
// levels already loaded are drawn first, under the sharper ones still coming. A small
// picture without a pyramid is shown whole as the one tile of its top level.
"use strict";

(function () {
  const CACHE_MAX = 400;
  const canvas = document.getElementById("viewer-canvas");
  const ctx = canvas.getContext("2d");
  let src = null; // { base, width, height, tile, overlap, max, whole }
  let view = { scale: 1, x: 0, y: 0 }; // screen px per picture px; picture px at the top left
  const cache = new Map(); // "L/c_r" -> { img, ok }
  let loaded = 0;

  function levelSize(level) {
    const f = 2 ** (src.max - level);
    return [Math.ceil(src.width / f), Math.ceil(src.height / f)];
  }

  function tileUrl(level, c, r) {
    return src.whole ? src.base : `${src.base}/tiles/${level}/${c}_${r}.png`;
  }

  function tileImage(level, c, r) {
    const key = `${level}/${c}_${r}`;
    let t = cache.get(key);
    if (!t) {
      if (cache.size >= CACHE_MAX) cache.delete(cache.keys().next().value);
      const img = new Image();
      t = { img, ok: false };
      img.onload = () => {
        t.ok = true;
        loaded++;
        canvas.dataset.tilesLoaded = String(loaded);
        draw();
      };
      img.src = tileUrl(level, c, r);
      cache.set(key, t);
    }
    return t;
  }

  // The level whose pixels are closest to (and not coarser than) the screen's.
  function levelFor(scale) {
    if (src.whole) return src.max;
    const want = src.max + Math.ceil(Math.log2(Math.max(scale, 1e-9)));
    return Math.min(src.max, Math.max(0, want));
  }

  function drawLevel(level, fetch) {
    const f = 2 ** (src.max - level); // picture px per level px
    const [lw, lh] = levelSize(level);
    const size = src.whole ? Math.max(lw, lh) : src.tile;
    const x0 = Math.max(0, view.x / f), y0 = Math.max(0, view.y / f);
    const x1 = Math.min(lw, (view.x + canvas.width / view.scale) / f);
    const y1 = Math.min(lh, (view.y + canvas.height / view.scale) / f);
    for (let r = Math.floor(y0 / size); r * size < y1; r++) {
      for (let c = Math.floor(x0 / size); c * size < x1; c++) {
        const t = fetch ? tileImage(level, c, r) : cache.get(`${level}/${c}_${r}`);
        if (!t || !t.ok) continue;
        // Tiles after the first in a row or column start `overlap` pixels early.
        const ox = c * size - (c > 0 && !src.whole ? src.overlap : 0);
        const oy = r * size - (r > 0 && !src.whole ? src.overlap : 0);
        const sx = (ox * f - view.x) * view.scale, sy = (oy * f - view.y) * view.scale;
        ctx.drawImage(t.img, sx, sy, t.img.naturalWidth * f * view.scale, t.img.naturalHeight * f * view.scale);
      }
    }
  }

  function draw() {
    if (!src) return;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.round(canvas.clientWidth * dpr), h = Math.round(canvas.clientHeight * dpr);
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = view.scale < 1;
    const level = levelFor(view.scale);
    for (let l = Math.max(0, level - 4); l < level; l++) drawLevel(l, false);
    drawLevel(level, true);
    canvas.dataset.level = String(level);
  }

  function fit() {
    const s = Math.min(canvas.width / src.width, canvas.height / src.height);
    view.scale = s;
    view.x = -(canvas.width / s - src.width) / 2;
    view.y = -(canvas.height / s - src.height) / 2;
    draw();
  }

  // Zooms by `k` keeping the picture point under (px, py) in place.
  function zoom(k, px = canvas.width / 2, py = canvas.height / 2) {
    const maxScale = 8 * (window.devicePixelRatio || 1);
    const minScale = Math.min(canvas.width / src.width, canvas.height / src.height) / 4;
    const s = Math.min(maxScale, Math.max(minScale, view.scale * k));
    const ix = view.x + px / view.scale, iy = view.y + py / view.scale;
    view.scale = s;
    view.x = ix - px / s;
    view.y = iy - py / s;
    draw();
  }

  const pointers = new Map();
  canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); pointers.set(e.pointerId, e); });
  canvas.addEventListener("pointerup", (e) => pointers.delete(e.pointerId));
  canvas.addEventListener("pointercancel", (e) => pointers.delete(e.pointerId));
  canvas.addEventListener("pointermove", (e) => {
    const last = pointers.get(e.pointerId);
    if (!last || !src) return;
    const dpr = window.devicePixelRatio || 1;
    if (pointers.size === 2) {
      // A pinch: the distance between the two fingers sets the zoom.
      const other = [...pointers.values()].find((p) => p.pointerId !== e.pointerId);
      const before = Math.hypot(last.clientX - other.clientX, last.clientY - other.clientY);
      const after = Math.hypot(e.clientX - other.clientX, e.clientY - other.clientY);
      if (before > 0) zoom(after / before, ((e.clientX + other.clientX) / 2) * dpr, ((e.clientY + other.clientY) / 2) * dpr);
    } else {
      view.x -= ((e.clientX - last.clientX) * dpr) / view.scale;
      view.y -= ((e.clientY - last.clientY) * dpr) / view.scale;
      draw();
    }
    pointers.set(e.pointerId, e);
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    zoom(Math.exp(-e.deltaY / 300), (e.clientX - r.left) * dpr, (e.clientY - r.top) * dpr);
  }, { passive: false });
  document.getElementById("zoom-in").addEventListener("click", () => zoom(2));
  document.getElementById("zoom-out").addEventListener("click", () => zoom(0.5));
  document.getElementById("zoom-fit").addEventListener("click", () => fit());
  window.addEventListener("resize", () => draw());

  window.tesseraViewer = {
    // `geometry` is /api/jobs/ID/images/N/dzi's answer.
    open(base, geometry) {
      if (!geometry.pyramid && !geometry.whole) {
        document.getElementById("viewer-params").textContent +=
          "\n\nThis picture has no Deep Zoom pyramid (rendered with --dzi never) and is too large to show whole: download it.";
      }
      src = { base, width: geometry.width, height: geometry.height, tile: geometry.tile,
        overlap: geometry.overlap, max: geometry.max_level, whole: !geometry.pyramid };
      cache.clear();
      loaded = 0;
      canvas.dataset.tilesLoaded = "0";
      if (!geometry.pyramid && !geometry.whole) return;
      requestAnimationFrame(() => { draw(); fit(); });
    },
    close() { src = null; cache.clear(); },
  };
})();
