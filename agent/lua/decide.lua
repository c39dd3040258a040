-- mqtt-affinity: one atomic placement decision for one MQTT CONNECT.
--
-- Why a script: two balancers deciding the same client id at the same moment must agree,
-- and a read-then-write from the agent would race. Inside the script the read, the rules
-- and the write are one step, so the second agent always sees the first agent's record.
--
-- KEYS[1]  <P>owner:<cid>   HASH {node, placed_at, by}
-- KEYS[2]  <P>pin:<cid>     HASH {node, reason, created_at}
-- ARGV[1]  P (key prefix)   ARGV[2] cid (raw bytes)
-- ARGV[3]  mode: "p" persistent | "c" clean
-- ARGV[4]  HRW candidate over the placeable nodes ("" = none)
-- ARGV[5]  record TTL in seconds (0 = never expires)
-- ARGV[6]  now (unix seconds, integer)
-- ARGV[7]  by (balancer label or agent id)
-- ARGV[8]  n = number of usable nodes, then n node names
-- then     m = number of evacuating nodes, then m pairs (node, moves per second)
-- then     k = number of nodes in restart grace (down for less than owner_down_grace), then k names
--
-- The placed:<node> and evac:<node>:<second> keys are derived from P inside the script,
-- so this is for a single (non-cluster) Redis, which is what the agent supports.
--
-- Returns {node, how, previous, pin_ignored}; "" stands for none.
-- how: HOW_HIT | HOW_ASSIGNED | HOW_MOVED | HOW_PINNED | HOW_NONE | HOW_WAIT
--
-- HOW_*, INFIX_* and NO_EXPIRY come from the prelude agent/model.py puts before this file
-- (one definition of the vocabulary); this file alone is not a complete script.

local owner_key = KEYS[1]
local pin_key = KEYS[2]
local prefix = ARGV[1]
local cid = ARGV[2]
local persistent = ARGV[3] == 'p'
local cand = ARGV[4]
local ttl = tonumber(ARGV[5])
local now = tonumber(ARGV[6])
local by = ARGV[7]

local usable = {}
local i = 8
local n = tonumber(ARGV[i])
for j = 1, n do usable[ARGV[i + j]] = true end
i = i + n + 1
local evac = {}
local m = tonumber(ARGV[i])
for j = 1, m do
  evac[ARGV[i + 2 * j - 1]] = tonumber(ARGV[i + 2 * j])
end
i = i + 2 * m + 1
local grace = {}
local k = tonumber(ARGV[i] or '0')
for j = 1, k do grace[ARGV[i + j]] = true end

local expiry = NO_EXPIRY
if ttl > 0 then expiry = now + ttl end

local function placed_key(node) return prefix .. INFIX_PLACED .. node end

local function set_ttl()
  if ttl > 0 then
    redis.call('EXPIRE', owner_key, ttl)
  else
    redis.call('PERSIST', owner_key)
  end
end

-- Write the record for node; previous (may be false/"") loses the placed-set entry.
local function place(node, previous)
  redis.call('HSET', owner_key, 'node', node, 'placed_at', now, 'by', by)
  set_ttl()
  if previous and previous ~= '' and previous ~= node then
    redis.call('ZREM', placed_key(previous), cid)
  end
  redis.call('ZADD', placed_key(node), expiry, cid)
end

local function refresh(node)
  set_ttl()
  redis.call('ZADD', placed_key(node), expiry, cid)
end

local owner = redis.call('HGET', owner_key, 'node')
if not owner then owner = '' end

-- 1. Pin.
local pin_ignored = ''
local pin = redis.call('HGET', pin_key, 'node')
if pin then
  if usable[pin] then
    if persistent then
      if owner ~= pin then place(pin, owner) else refresh(pin) end
    end
    local prev = ''
    if owner ~= pin then prev = owner end
    return {pin, HOW_PINNED, prev, ''}
  end
  pin_ignored = pin
end

-- 2. Existing owner.
if owner ~= '' then
  if usable[owner] then
    local rate = evac[owner]
    if rate ~= nil and cand ~= '' and cand ~= owner then
      if not persistent then
        -- No session to carry over: a clean client simply leaves, without using the budget.
        return {cand, HOW_MOVED, owner, pin_ignored}
      end
      -- The bucket's second comes from Redis's clock, not the agent's: agents whose
      -- clocks differ must still share one budget per second.
      local bucket = prefix .. INFIX_EVAC .. owner .. ':' .. redis.call('TIME')[1]
      local used = redis.call('INCR', bucket)
      if used == 1 then redis.call('EXPIRE', bucket, 2) end
      if used <= rate then
        place(cand, owner)
        return {cand, HOW_MOVED, owner, pin_ignored}
      end
    end
    if persistent then refresh(owner) end
    return {owner, HOW_HIT, '', pin_ignored}
  end
  -- Owner is down, in maintenance or no longer configured.
  if persistent and grace[owner] then
    -- Down for less than the grace: moving would start an empty session elsewhere and
    -- strand the one on the owner. The client retries and comes back when it is up.
    return {'', HOW_WAIT, owner, pin_ignored}
  end
  if cand ~= '' and cand ~= owner then
    if persistent then place(cand, owner) end
    return {cand, HOW_MOVED, owner, pin_ignored}
  end
  return {'', HOW_NONE, owner, pin_ignored}
end

-- 3. No record.
if cand == '' then
  return {'', HOW_NONE, '', pin_ignored}
end
if persistent then
  place(cand, false)
  return {cand, HOW_ASSIGNED, '', pin_ignored}
end
return {cand, HOW_NONE, '', pin_ignored}
