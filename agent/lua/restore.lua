-- mqtt-affinity: put back a placement a failover may have lost (the agent's failover journal).
--
-- KEYS[1]  P{<bucket>}o   ARGV[1] cid   ARGV[2] the record as the agent wrote it ("node|expiry|placed_at|by")
--
-- After a Redis failover (or a restart) the new primary may lack the last writes the old one
-- acknowledged. Each agent writes back the placements it made in the last seconds, unless the
-- record there now is at least as recent (placed_at): a newer placement made since wins.
-- Returns 1 when the record was put back, 0 when it was already there or a newer one is.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local function placed_at(v)
  local a = string.find(v, SEP, 1, true)
  if not a then return -1 end
  local b = string.find(v, SEP, a + 1, true)
  if not b then return -1 end
  local c = string.find(v, SEP, b + 1, true)
  return tonumber(string.sub(v, b + 1, (c or 0) - 1)) or -1
end
if cur and (cur == ARGV[2] or placed_at(cur) >= placed_at(ARGV[2])) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
