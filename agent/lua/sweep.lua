-- mqtt-affinity: sweep one record bucket: drop expired owner records and pins, count sessions.
--
-- KEYS[1]  P{<bucket>}o   owner records      KEYS[2]  P{<bucket>}p   pins
-- ARGV[1]  now (unix seconds)
--
-- Returns {pins_left, node1, count1, node2, count2, ...}: the live sessions of this bucket
-- per owner node. The agent holding the sweep lease adds them up over every bucket.
local now = tonumber(ARGV[1])
local counts = {}
local function sweep(key, count)
  local all = redis.call('HGETALL', key)
  local left = 0
  for j = 1, #all, 2 do
    local v = all[j + 1]
    local a = string.find(v, SEP, 1, true)
    local node = v
    local exp = NEVER
    if a then
      node = string.sub(v, 1, a - 1)
      local b = string.find(v, SEP, a + 1, true)
      exp = tonumber(string.sub(v, a + 1, (b or 0) - 1)) or NEVER
    end
    if exp ~= NEVER and exp <= now then
      redis.call('HDEL', key, all[j])
    else
      left = left + 1
      if count then counts[node] = (counts[node] or 0) + 1 end
    end
  end
  return left
end
sweep(KEYS[1], true)
local out = {sweep(KEYS[2], false)}
for node, n in pairs(counts) do
  out[#out + 1] = node
  out[#out + 1] = n
end
return out
