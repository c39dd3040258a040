-- mqtt-affinity: extend the expiry of records the agent answered from its cache (write-behind).
--
-- KEYS[1]  P{<bucket>}o   ARGV[1] now   then triples: cid, node, new expiry (0 = never)
--
-- A cached hit answers without Redis; the record's expiry still has to follow the client's
-- CONNECTs, so the agent collects those refreshes and writes them per bucket every second.
-- A record is only extended while it still names the node the agent answered with (another
-- agent may have moved it meanwhile: then its record stands). Returns how many were written.
local now = tonumber(ARGV[1])
local written = 0
for i = 2, #ARGV, 3 do
  local cid, node, expiry = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local rec = redis.call('HGET', KEYS[1], cid)
  if rec then
    local a = string.find(rec, SEP, 1, true)
    local b = a and string.find(rec, SEP, a + 1, true)
    if a and b and string.sub(rec, 1, a - 1) == node then
      local old = tonumber(string.sub(rec, a + 1, b - 1)) or NEVER
      local live = old == NEVER or old > now
      if live and old ~= NEVER and (expiry == NEVER or expiry > old) then
        redis.call('HSET', KEYS[1], cid, node .. SEP .. expiry .. SEP .. string.sub(rec, b + 1))
        written = written + 1
      end
    end
  end
end
return written
