-- mqtt-affinity: claim one move from a node's evacuation budget, shared by every agent.
--
-- KEYS[1]  P evac-budget:<node>   STRING "<second> <moves>" (one key: any Cluster slot)
-- ARGV[1]  moves allowed per second
--
-- The second is Redis's own clock (TIME), not the agents': agents whose clocks differ still
-- share one budget per second. Returns that second (granted: the move is made as of it, so
-- its record's placed_at names the second whose budget it used) or 0.
local rate = tonumber(ARGV[1])
local second = redis.call('TIME')[1]
local used = 0
local cur = redis.call('GET', KEYS[1])
if cur then
  local s, n = string.match(cur, '^(%d+) (%d+)$')
  if s == second then used = tonumber(n) end
end
if used >= rate then return 0 end
redis.call('SET', KEYS[1], second .. ' ' .. (used + 1), 'EX', 2)
return tonumber(second)
