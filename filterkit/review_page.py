"""The page ``filterkit review`` serves: one HTML document with its style and script inline.

The first state comes inside the page (no second request before the first paint); each mark
posts to the server and redraws from the state it answers. Thumbnails load lazily from
``/thumb/N``. Keys: k keep, r reject, u undo, j / arrow right or down: next, arrow left or
up: previous; the other kinds take the keys of their verdicts (dedup: c confirm, s split;
dedup --against: c duplicate, r not a duplicate; outliers: o outlier, f fine). A verdict's
border is green where it agrees with the report, red where not.
"""

from __future__ import annotations

import json

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:10px 18px;z-index:2}
h1{font-size:1.2em;margin:0 0 4px}h2{font-size:1.05em;margin:18px 18px 6px}
#stats{font-size:13px}#help{font-size:12px;color:#555;margin-top:2px}#msg{font-size:12px;color:#a40}
kbd{border:1px solid #bbb;border-radius:3px;padding:0 3px;background:#f4f4f4;font-size:11px}
.grid{display:flex;flex-wrap:wrap;gap:10px;padding:0 18px}
.card{width:300px;border:2px solid #ddd;border-radius:6px;padding:6px;font-size:12px;background:#fff}
.card.keep{border-color:#2a2}.card.review{border-color:#36c}.card.reject{border-color:#c33}
.card.error{border-color:#c90}.card.marked{border-color:#999;background:#f3f3f3}
.card.cur{outline:3px solid #f90;outline-offset:2px}
.pics{display:flex;gap:6px;align-items:flex-start}
.pics img{width:140px;height:140px;object-fit:contain;background:#eee}
.pics .ex{width:100px;height:100px}figure{margin:0;font-size:10px;color:#666}
.name{word-break:break-all;font-weight:600;margin-top:3px}.reason{color:#555}
.dir{word-break:break-all;color:#888;font-size:10px}
.nopic{display:flex;width:140px;height:140px;align-items:center;justify-content:center;background:#eee;color:#777}
.score{font-variant-numeric:tabular-nums}
.btns{margin-top:5px;display:flex;gap:6px}button{font-size:12px;padding:3px 10px;cursor:pointer}
.bk{background:#e6f4e6}.br{background:#f8e4e4}.tag{font-weight:600}
.group{margin:8px 18px;border:2px solid #ddd;border-radius:6px;padding:6px;background:#fff;font-size:12px}
.group figure{max-width:200px;word-break:break-all}
.group.v0{border-color:#2a2}.group.v1{border-color:#c33}.group.cur{outline:3px solid #f90}
"""

_SCRIPT = r"""
const S={state:JSON.parse(document.getElementById('state').textContent),cur:0,order:[],busy:Promise.resolve()};
const $=id=>document.getElementById(id);
const esc=s=>String(s==null?'':s).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const f3=v=>v==null?'-':Number(v).toFixed(3);
const SECTIONS=[['review','To review (score near the threshold)'],['keep','Kept'],['reject','Rejected'],
                ['marked','Marked by you'],['error','Could not be read']];
function section(it){return it.mark?'marked':it.decision;}
function renderFilter(){
  const st=S.state,t=st.threshold,h=st.history,last=h[h.length-1],first=h[0];
  $('stats').innerHTML=`round <b>${st.round}</b>: <b>${last.review}</b> to review`+
    (st.round?` (was ${first.review})`:'')+` &middot; ${last.keep} kept &middot; ${last.reject} rejected &middot; `+
    `<b>${last.marked}</b> marked &middot; threshold ${f3(t)} &plusmn; ${f3(st.review_band)} &middot; `+
    `${st.exemplars} keep-like, ${st.negatives} reject-like exemplars &middot; marks saved to ${esc(st.labels)}`;
  $('help').innerHTML='<kbd>k</kbd> keep &nbsp;<kbd>r</kbd> reject &nbsp;<kbd>u</kbd> undo &nbsp;'+
    '<kbd>j</kbd>/<kbd>&rarr;</kbd> next &nbsp;<kbd>&larr;</kbd> previous'+(st.rescoring?'':' &middot; '+esc(st.note));
  const parts=[];S.order=[];
  for(const [key,title] of SECTIONS){
    let its=st.items.filter(it=>section(it)===key);
    if(!its.length)continue;
    if(key==='review')its.sort((a,b)=>Math.abs(a.score-t)-Math.abs(b.score-t));
    else if(key==='marked')its.sort((a,b)=>a.name<b.name?-1:1);
    else its.sort((a,b)=>(b.score??-9)-(a.score??-9));
    parts.push(`<h2>${title} (${its.length})</h2><div class="grid">`);
    for(const it of its){const k=S.order.length;S.order.push(it);parts.push(card(it,k));}
    parts.push('</div>');
  }
  $('list').innerHTML=parts.join('');
}
function card(it,k){
  const near=it.nearest_file==null?'':`<figure><img class="ex" loading="lazy" alt="" src="/thumb/${it.nearest_file}">`+
    `<figcaption>nearest: ${esc(it.nearest)}</figcaption></figure>`;
  const can=it.decision!=='error',cut=Math.max(it.name.lastIndexOf('/'),it.name.lastIndexOf('\\'))+1;
  const what=it.mark?`<span class="tag">marked ${it.mark} by you</span> &middot; score ${f3(it.score)} before`:
    `${it.decision} &middot; score ${f3(it.score)}`;
  const pic=can?`<img loading="lazy" alt="" src="/thumb/${it.file}">`:'<span class="nopic">(no preview)</span>';
  const btn=(act,cls,label)=>it.mark===act?'':`<button class="${cls}" data-act="${act}">${label}</button>`;
  return `<div class="card ${it.mark?'marked':it.decision}" id="c${k}" data-k="${k}" data-name="${esc(it.name)}">`+
    `<div class="pics">${pic}${near}</div><div class="name">${esc(it.name.slice(cut))}</div>`+
    `<div class="dir">${esc(it.name.slice(0,cut))}</div><div class="score">${what}</div>`+
    `<div class="reason">${esc(it.reason)}</div>`+(can?'<div class="btns">'+btn('keep','bk','Keep (k)')+
    btn('reject','br','Reject (r)')+(it.mark?'<button data-act="undo">Undo (u)</button>':'')+'</div>':'')+'</div>';
}
function renderVerdicts(){
  const st=S.state,done=st.entries.filter(e=>e.verdict).length,vs=st.verdicts;
  $('stats').innerHTML=`${st.entries.length} ${st.noun}${st.entries.length===1?'':'s'} &middot; <b>${done}</b> decided &middot; verdicts saved to ${esc(st.labels)}`;
  $('help').innerHTML=vs.map(([v,key,label])=>`<kbd>${key}</kbd> ${esc(label.toLowerCase())} &nbsp;`).join('')+
    '<kbd>u</kbd> undo &nbsp;<kbd>j</kbd>/<kbd>&rarr;</kbd> next &nbsp;<kbd>&larr;</kbd> previous'+
    (st.summary?' &middot; '+esc(st.summary):'');
  S.order=st.entries;
  const said=v=>{const i=vs.findIndex(x=>x[0]===v);return i<0?'':'v'+i;};
  $('list').innerHTML=st.entries.map((g,k)=>`<div class="group ${said(g.verdict)}" id="c${k}" data-k="${k}">`+
    `<div class="pics">${g.members.map(m=>`<figure><img loading="lazy" alt="" src="/thumb/${m.file}"><figcaption>`+
    `${esc(m.caption)}: ${esc(m.name)}</figcaption></figure>`).join('')}</div>`+
    `<div class="reason">${esc(g.why)}${g.verdict?' &middot; <b>marked '+
    esc(vs.find(x=>x[0]===g.verdict)[2].toLowerCase())+' by you</b>':''}</div><div class="btns">`+
    vs.map(([v,key,label],i)=>`<button class="${['bk','br'][i]}" data-act="${v}">${esc(label)} (${key})</button>`).join('')+
    `${g.verdict?'<button data-act="undo">Undo (u)</button>':''}</div></div>`).join('');
}
function render(){(S.state.verdicts?renderVerdicts:renderFilter)();focus(Math.min(S.cur,S.order.length-1),false);}
function focus(k,scroll=true){
  document.querySelectorAll('.cur').forEach(e=>e.classList.remove('cur'));
  if(k<0)return;S.cur=k;const e=$('c'+k);if(!e)return;e.classList.add('cur');
  if(scroll)e.scrollIntoView({block:'nearest'});
}
function act(k,what){
  S.busy=S.busy.then(async()=>{
    const item=S.order[k];if(!item)return;
    const verdicts=!!S.state.verdicts,next=S.order[k+1];
    const body=verdicts?{entry:k,verdict:what==='undo'?null:what}:{name:item.name,label:what==='undo'?null:what};
    $('msg').textContent=verdicts?'saving...':'saving and re-scoring...';
    try{
      const r=await fetch(verdicts?'/api/verdict':'/api/mark',{method:'POST',headers:{'Content-Type':'application/json'},body:JSON.stringify(body)});
      const st=await r.json();
      if(!r.ok){$('msg').textContent=st.error||('error '+r.status);return;}
      S.state=st;$('msg').textContent='';
      if(verdicts){S.cur=Math.min(k+1,st.entries.length-1);render();}
      else{render();const n=next?S.order.findIndex(o=>o.name===next.name):-1;S.cur=n>=0?n:Math.min(k,S.order.length-1);}
      focus(S.cur);document.body.dataset.round=st.round??'';
    }catch(e){$('msg').textContent='the server did not answer: '+e;}
  });
}
document.addEventListener('click',e=>{
  const c=e.target.closest('[data-k]');if(!c)return;const k=+c.dataset.k;
  const b=e.target.closest('button[data-act]');if(b)act(k,b.dataset.act);else focus(k,false);
});
document.addEventListener('keydown',e=>{
  if(e.ctrlKey||e.metaKey||e.altKey)return;
  const vs=S.state.verdicts,keys=vs?Object.fromEntries([...vs.map(([v,key])=>[key,v]),['u','undo']]):
    {k:'keep',r:'reject',u:'undo'};
  if(keys[e.key]){e.preventDefault();act(S.cur,keys[e.key]);}
  else if(['j','ArrowRight','ArrowDown'].includes(e.key)){e.preventDefault();focus(Math.min(S.cur+1,S.order.length-1));}
  else if(['ArrowLeft','ArrowUp'].includes(e.key)){e.preventDefault();focus(Math.max(S.cur-1,0));}
});
render();document.body.dataset.round=S.state.round??'';
"""


def render_page(state: dict) -> bytes:
    """The whole page for a session's current ``state()``."""
    title = f"filterkit review: {state['report']}"
    data = json.dumps(state).replace("<", "\\u003c")  # nothing in the data can end the script element
    from html import escape

    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{_STYLE}</style></head><body><header><h1>{escape(title)}</h1><div id="stats"></div>'
            f'<div id="help"></div><div id="msg" role="status"></div></header><main id="list"></main>'
            f'<script type="application/json" id="state">{data}</script><script>{_SCRIPT}</script>'
            "</body></html>\n").encode("utf-8", errors="surrogateescape")
