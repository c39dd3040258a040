-- mqtt-affinity: one atomic placement decision for one MQTT CONNECT.
--
-- Why a script: two balancers deciding the same client id at the same moment must agree,
-- and a read-then-write from the agent would race. Inside the script the read, the rules
-- and the write are one step, so the second agent always sees the first agent's record.
--
-- Every key it touches is declared and shares the client's hash tag (one Cluster slot):
-- KEYS[1]  P{<bucket>}o   HASH cid -> "node|expiry|placed_at|by"      (owner records)
-- KEYS[2]  P{<bucket>}p   HASH cid -> "node|expiry|created_at|reason" (pins)
-- KEYS[3]  P owner:<cid>  (optional) version-1 owner HASH, read through and moved in
-- KEYS[4]  P pin:<cid>    (optional) version-1 pin HASH, read through and moved in
-- ARGV[1]  cid (raw bytes)
-- ARGV[2]  mode: "p" persistent | "c" clean
-- ARGV[3]  HRW candidate over the placeable nodes ("" = none)
-- ARGV[4]  record TTL in seconds (0 = never expires)
-- ARGV[5]  now (unix seconds, integer)
-- ARGV[6]  by (balancer label or agent id)
-- ARGV[7]  evacuation token: the node this agent may move the client off now ("" = none)
-- ARGV[8]  refresh step: a hit rewrites the record only when its expiry would move by this much
-- ARGV[9]  n = number of usable nodes, then n node names
-- then     m = number of evacuating nodes, then m names
-- then     k = number of nodes in restart grace (down for less than owner_down_grace), then k names
--
-- Returns {node, how, previous, pin_ignored, flag}; "" stands for none. flag "w": a placement
-- was written. flag "e": the owner is evacuating and the client would move to the candidate:
-- the agent claims one move from the shared budget (claim.lua) and, if granted, asks again
-- with the token in ARGV[7].
-- how: HOW_HIT | HOW_ASSIGNED | HOW_MOVED | HOW_PINNED | HOW_NONE | HOW_WAIT
--
-- HOW_*, SEP and NEVER come from the prelude agent/model.py puts before this file (one
-- definition of the vocabulary), v1_import from v1.lua; this file alone is not a complete script.

local owners = KEYS[1]
local pins = KEYS[2]
local cid = ARGV[1]
local persistent = ARGV[2] == 'p'
local cand = ARGV[3]
local ttl = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local by = ARGV[6]
local token = ARGV[7]
local step = tonumber(ARGV[8])

local function set_of(i)
  local s = {}
  local n = tonumber(ARGV[i])
  for j = 1, n do s[ARGV[i + j]] = true end
  return s, i + n + 1
end
local usable, i = set_of(9)
local evac
evac, i = set_of(i)
local grace = set_of(i)

local expiry = NEVER
if ttl > 0 then expiry = now + ttl end

-- "node|expiry|rest" -> node, expiry, rest (rest: placed_at|by or created_at|reason)
local function parse(v)
  local a = string.find(v, SEP, 1, true)
  if not a then return v, NEVER, '' end
  local b = string.find(v, SEP, a + 1, true)
  if not b then return string.sub(v, 1, a - 1), tonumber(string.sub(v, a + 1)) or NEVER, '' end
  return string.sub(v, 1, a - 1), tonumber(string.sub(v, a + 1, b - 1)) or NEVER, string.sub(v, b + 1)
end

local function live(exp) return exp == NEVER or exp > now end

-- Version 1 keys (one HASH per client, TTL on the key) move into the buckets on first sight
-- (v1_import comes from v1.lua, put before this file).
v1_import(KEYS[3], owners, cid, now, 'placed_at', 'by')
v1_import(KEYS[4], pins, cid, now, 'created_at', 'reason')

local owner = ''
local owner_exp = NEVER
local owner_rest = ''
local rec = redis.call('HGET', owners, cid)
if rec then
  owner, owner_exp, owner_rest = parse(rec)
  if not live(owner_exp) then owner = '' end
end

-- The last element of every answer: 'w' once a placement was written (the agent keeps it in
-- its failover journal, and waits for replicas when asked to), 'e' for an evacuation candidate.
local flag = ''

local function place(node)
  redis.call('HSET', owners, cid, node .. SEP .. expiry .. SEP .. now .. SEP .. by)
  flag = 'w'
end

-- A hit keeps placed_at and by; it rewrites the record only when the expiry would move by
-- at least `step`, so a client that reconnects often costs a read, not a write, each time.
local function refresh()
  local stale
  if expiry == NEVER then
    stale = owner_exp ~= NEVER
  elseif owner_exp == NEVER then
    stale = true -- the session used to be kept forever; this CONNECT asks for an expiry
  else
    stale = expiry - owner_exp >= step
  end
  if stale then redis.call('HSET', owners, cid, owner .. SEP .. expiry .. SEP .. owner_rest) end
end

-- 1. Pin.
local pin_ignored = ''
local prec = redis.call('HGET', pins, cid)
if prec then
  local pin, pin_exp = parse(prec)
  if live(pin_exp) then
    if usable[pin] then
      if persistent then
        if owner ~= pin then place(pin) else refresh() end
      end
      local prev = ''
      if owner ~= pin then prev = owner end
      return {pin, HOW_PINNED, prev, '', flag}
    end
    pin_ignored = pin
  end
end

-- 2. Existing owner.
if owner ~= '' then
  if usable[owner] then
    if evac[owner] and cand ~= '' and cand ~= owner then
      if not persistent then
        -- No session to carry over: a clean client simply leaves, without using the budget.
        return {cand, HOW_MOVED, owner, pin_ignored, flag}
      end
      if token == owner then
        place(cand)
        return {cand, HOW_MOVED, owner, pin_ignored, flag}
      end
      refresh()
      return {owner, HOW_HIT, '', pin_ignored, 'e'}
    end
    if persistent then refresh() end
    return {owner, HOW_HIT, '', pin_ignored, flag}
  end
  -- Owner is down, in maintenance or no longer configured.
  if persistent and grace[owner] then
    -- Down for less than the grace: moving would start an empty session elsewhere and
    -- strand the one on the owner. The client retries and comes back when it is up.
    return {'', HOW_WAIT, owner, pin_ignored, flag}
  end
  if cand ~= '' and cand ~= owner then
    if persistent then place(cand) end
    return {cand, HOW_MOVED, owner, pin_ignored, flag}
  end
  return {'', HOW_NONE, owner, pin_ignored, flag}
end

-- 3. No record (or an expired one).
if cand == '' then
  return {'', HOW_NONE, '', pin_ignored, flag}
end
if persistent then
  place(cand)
  return {cand, HOW_ASSIGNED, '', pin_ignored, flag}
end
return {cand, HOW_NONE, '', pin_ignored, flag}
