-- mqtt-affinity: the shared budget of active evacuation, one token bucket per node.
--
-- Every agent that closes an evacuating node's client connections takes its tokens here
-- first, so the node empties at `rate` connections per second in total, however many
-- balancers there are. The clock is Redis's own (TIME): agents whose clocks differ still
-- share one budget.
--
-- KEYS[1]  <P>evict:<node>   HASH {tokens, at}   (one key: works on Redis Cluster too)
-- ARGV[1]  rate   tokens per second (> 0)
-- ARGV[2]  burst  bucket capacity (>= 1): the most one call can get after an idle spell
-- ARGV[3]  want   tokens asked for (> 0); a negative number gives |want| unused tokens back
--
-- Returns the tokens granted (0 .. want), or 0 for a refund.

local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  -- A new evacuation starts empty: closes flow at `rate` from the first one, without a burst,
  -- so the clients' reconnects (and their moves, which decide.lua budgets per second at the
  -- same rate) arrive as evenly as they were closed.
  tokens = 0
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
end

local granted = 0
if want < 0 then
  tokens = math.min(burst, tokens - want)
else
  granted = math.floor(math.min(want, tokens))
  if granted < 0 then granted = 0 end
  tokens = tokens - granted
end

redis.call('HSET', key, 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
-- Long enough to outlive any pause between two ticks of an evacuation; short enough to
-- leave nothing behind.
redis.call('EXPIRE', key, 60)
return granted
