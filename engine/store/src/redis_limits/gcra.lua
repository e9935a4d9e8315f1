-- Takes ARGV[3] cells from the bucket KEYS[1] if they fit, with one cell every ARGV[1]
-- microseconds and up to ARGV[2] at once. When ARGV[4] is "1", a second bucket KEYS[2] (ARGV[5]
-- µs per cell, burst ARGV[6], ARGV[7] cells) must fit too, and both are taken or neither.
-- Returns {1, remaining cells of the first bucket, µs until it is full again} or
-- {0, µs to wait, which bucket refused (1 or 2)}.
local a_tat, a_wait = probe(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
if a_wait > 0 then return {0, a_wait, 1} end
local b_tat
if ARGV[4] == "1" then
  local b_wait
  b_tat, b_wait = probe(KEYS[2], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]))
  if b_wait > 0 then return {0, b_wait, 2} end
  store_tat(KEYS[2], b_tat)
end
store_tat(KEYS[1], a_tat)
local every = tonumber(ARGV[1])
local remaining = math.floor((now + every * tonumber(ARGV[2]) - a_tat) / every)
return {1, remaining, a_tat - now}
