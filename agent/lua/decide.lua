-- mqtt-affinity: atomic placement decisions, one per MQTT CONNECT, N per call.
--
-- Why a script: two balancers deciding the same client id at the same moment must agree,
-- and a read-then-write from the agent would race. Inside the script the read, the rules
-- and the write are one step, so the second agent always sees the first agent's record.
-- Why N per call: decisions that queue within one turn of the agent's event loop go to Redis
-- as one call; each decision is still atomic (a script runs alone), and the arguments every
-- decision shares (the node sets) travel once.
--
-- Every key is declared; the keys of one decision share the client's hash tag (one Cluster
-- slot; on a Cluster the agent only batches decisions of one slot):
-- KEYS, for decision d (stride s = 2, or 4 while version-1 keys are read through):
--   KEYS[s*(d-1)+1]  P{<bucket>}o   HASH cid -> "node|expiry|placed_at|by"      (owner records)
--   KEYS[s*(d-1)+2]  P{<bucket>}p   HASH cid -> "node|expiry|created_at|reason" (pins)
--   KEYS[s*(d-1)+3]  P owner:<cid>  version-1 owner HASH, read through and moved in (s = 4)
--   KEYS[s*(d-1)+4]  P pin:<cid>    version-1 pin HASH, read through and moved in (s = 4)
-- ARGV[1]  N, the number of decisions      ARGV[2]  s, the key stride
-- ARGV[3]  now (unix seconds, integer)
-- ARGV[4]  n = number of usable nodes, then n node names
-- then     m = number of evacuating nodes, then m names
-- then     k = number of nodes in restart grace (down for less than owner_down_grace), then k names
-- then, per decision, 7 fields:
--   cid (raw bytes); mode ("p" persistent | "c" clean); the HRW candidate over the placeable
--   nodes ("" = none); record TTL in seconds (0 = never expires); refresh step (a hit rewrites
--   the record only when its expiry would move by this much); by (balancer label); evacuation
--   token (the node this agent may move the client off now, "" = none)
--
-- Returns, per decision, 9 values ("" stands for none):
--   node, how, previous, pin_ignored, flag, owner, owner_expiry, pin, pin_expiry
-- flag "w": a placement was written. flag "e": the owner is evacuating and the client would
-- move to the candidate: the agent claims one move from the shared budget (claim.lua) and, if
-- granted, asks again with the token. owner/owner_expiry and pin/pin_expiry: the client's
-- record and live pin after the decision (what the agent may cache).
-- how: HOW_HIT | HOW_ASSIGNED | HOW_MOVED | HOW_PINNED | HOW_NONE | HOW_WAIT
--
-- HOW_*, SEP and NEVER come from the prelude agent/model.py puts before this file (one
-- definition of the vocabulary), v1_import from v1.lua; this file alone is not a complete script.

local count = tonumber(ARGV[1])
local stride = tonumber(ARGV[2])
local now = tonumber(ARGV[3])

local function set_of(i)
  local s = {}
  local n = tonumber(ARGV[i])
  for j = 1, n do s[ARGV[i + j]] = true end
  return s, i + n + 1
end
local usable, i = set_of(4)
local evac
evac, i = set_of(i)
local grace
grace, i = set_of(i)

-- "node|expiry|rest" -> node, expiry, rest (rest: placed_at|by or created_at|reason)
local function parse(v)
  local a = string.find(v, SEP, 1, true)
  if not a then return v, NEVER, '' end
  local b = string.find(v, SEP, a + 1, true)
  if not b then return string.sub(v, 1, a - 1), tonumber(string.sub(v, a + 1)) or NEVER, '' end
  return string.sub(v, 1, a - 1), tonumber(string.sub(v, a + 1, b - 1)) or NEVER, string.sub(v, b + 1)
end

local function live(exp) return exp == NEVER or exp > now end

local function decide(owners, pins, v1_owner, v1_pin, cid, persistent, cand, ttl, step, by, token)
  -- Version-1 keys (one HASH per client, TTL on the key) move into the buckets on first sight.
  v1_import(v1_owner, owners, cid, now, 'placed_at', 'by')
  v1_import(v1_pin, pins, cid, now, 'created_at', 'reason')

  local expiry = NEVER
  if ttl > 0 then expiry = now + ttl end
  local flag = ''
  local owner, owner_exp, owner_rest = '', NEVER, ''
  local rec = redis.call('HGET', owners, cid)
  if rec then
    owner, owner_exp, owner_rest = parse(rec)
    if not live(owner_exp) then owner = '' end
  end

  local function place(node)
    redis.call('HSET', owners, cid, node .. SEP .. expiry .. SEP .. now .. SEP .. by)
    owner, owner_exp, flag = node, expiry, 'w'
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
    if stale then
      redis.call('HSET', owners, cid, owner .. SEP .. expiry .. SEP .. owner_rest)
      owner_exp = expiry
    end
  end

  local pin, pin_exp = '', NEVER
  local prec = redis.call('HGET', pins, cid)
  if prec then
    pin, pin_exp = parse(prec)
    if not live(pin_exp) then pin = '' end
  end

  local function answer(node, how, previous, ignored)
    return node, how, previous, ignored, flag, owner, owner_exp, pin, pin_exp
  end

  -- 1. Pin.
  local pin_ignored = ''
  if pin ~= '' then
    if usable[pin] then
      local prev = ''
      if owner ~= pin then prev = owner end
      if persistent then
        if owner ~= pin then place(pin) else refresh() end
      end
      return answer(pin, HOW_PINNED, prev, '')
    end
    pin_ignored = pin
  end

  -- 2. Existing owner.
  if owner ~= '' then
    if usable[owner] then
      if evac[owner] and cand ~= '' and cand ~= owner then
        if not persistent then
          -- No session to carry over: a clean client simply leaves, without using the budget.
          return answer(cand, HOW_MOVED, owner, pin_ignored)
        end
        if token == owner then
          local from = owner
          place(cand)
          return answer(cand, HOW_MOVED, from, pin_ignored)
        end
        refresh()
        flag = 'e'
        return answer(owner, HOW_HIT, '', pin_ignored)
      end
      if persistent then refresh() end
      return answer(owner, HOW_HIT, '', pin_ignored)
    end
    -- Owner is down, in maintenance or no longer configured.
    if persistent and grace[owner] then
      -- Down for less than the grace: moving would start an empty session elsewhere and
      -- strand the one on the owner. The client retries and comes back when it is up.
      return answer('', HOW_WAIT, owner, pin_ignored)
    end
    if cand ~= '' and cand ~= owner then
      local from = owner
      if persistent then place(cand) end
      return answer(cand, HOW_MOVED, from, pin_ignored)
    end
    return answer('', HOW_NONE, owner, pin_ignored)
  end

  -- 3. No record (or an expired one).
  if cand == '' then
    return answer('', HOW_NONE, '', pin_ignored)
  end
  if persistent then
    place(cand)
    return answer(cand, HOW_ASSIGNED, '', pin_ignored)
  end
  return answer(cand, HOW_NONE, '', pin_ignored)
end

local out = {}
for d = 1, count do
  local k = stride * (d - 1)
  local a = i + 7 * (d - 1)
  local v1_owner, v1_pin = nil, nil
  if stride == 4 then v1_owner, v1_pin = KEYS[k + 3], KEYS[k + 4] end
  local results = {decide(
    KEYS[k + 1], KEYS[k + 2], v1_owner, v1_pin,
    ARGV[a], ARGV[a + 1] == 'p', ARGV[a + 2], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), ARGV[a + 5],
    ARGV[a + 6])}
  for j = 1, 9 do out[#out + 1] = results[j] end
end
return out
