-- GCRA over Redis server time: takes ARGV[3] cells from the bucket KEYS[1] (its theoretical
-- arrival time, in microseconds) if they fit, with one cell every ARGV[1] microseconds and up to
-- ARGV[2] at once. When ARGV[4] is "1", a second bucket KEYS[2] (ARGV[5] µs per cell, burst
-- ARGV[6], ARGV[7] cells) must fit too, and both are taken or neither.
-- Returns {1, remaining cells of the first bucket, µs until it is full again} or
-- {0, µs to wait, which bucket refused (1 or 2)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function probe(key, every, burst, cells)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + every * cells
  local allow_at = new_tat - every * burst
  return new_tat, allow_at - now
end
local a_tat, a_wait = probe(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
if a_wait > 0 then return {0, a_wait, 1} end
local b_tat
if ARGV[4] == "1" then
  local b_wait
  b_tat, b_wait = probe(KEYS[2], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]))
  if b_wait > 0 then return {0, b_wait, 2} end
  redis.call('SET', KEYS[2], string.format('%.0f', b_tat), 'PX', math.floor((b_tat - now) / 1000) + 1000)
end
redis.call('SET', KEYS[1], string.format('%.0f', a_tat), 'PX', math.floor((a_tat - now) / 1000) + 1000)
local every = tonumber(ARGV[1])
local remaining = math.floor((now + every * tonumber(ARGV[2]) - a_tat) / every)
return {1, remaining, a_tat - now}
