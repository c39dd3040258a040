-- mqtt-affinity: put back placements a failover may have lost (the agent's failover journal).
--
-- KEYS[1]  P{<bucket>}o   ARGV  cid, record, cid, record, ... (records as the agent wrote them:
--                               "node|expiry|placed_at|by"), every cid of this bucket
--
-- After a Redis failover (or a restart) the new primary may lack the last writes the old one
-- acknowledged. Each agent writes back the placements it made in the last seconds, unless the
-- record there now is at least as recent (placed_at): a newer placement made since wins.
-- Returns how many records were put back.
local function placed_at(v)
  local a = string.find(v, SEP, 1, true)
  if not a then return -1 end
  local b = string.find(v, SEP, a + 1, true)
  if not b then return -1 end
  local c = string.find(v, SEP, b + 1, true)
  return tonumber(string.sub(v, b + 1, (c or 0) - 1)) or -1
end
local restored = 0
for i = 1, #ARGV - 1, 2 do
  local cid, record = ARGV[i], ARGV[i + 1]
  local cur = redis.call('HGET', KEYS[1], cid)
  if not (cur and (cur == record or placed_at(cur) >= placed_at(record))) then
    redis.call('HSET', KEYS[1], cid, record)
    restored = restored + 1
  end
end
return restored
