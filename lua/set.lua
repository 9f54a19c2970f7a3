-- set: write-through in a namespace: stamp the entry with the namespace's
-- current generation (creating one if it has none) and write it.
-- KEYS[1]  the entry key
-- KEYS[2]  the namespace generation key
-- ARGV[1]  the entry (its generation bytes are filled in here)
-- ARGV[2]  its lifetime in milliseconds
-- ARGV[3]  8 random bytes: the generation to create if the namespace has none
-- ARGV[4]  lifetime of the generation key in milliseconds
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' and #cur >= 40 and string.sub(cur, 5, 20) == string.sub(ARGV[1], 5, 20) then
  return 1 -- a client retry of a call that already wrote: keep its generation
end
local gen = redis.pcall('GET', KEYS[2])
if type(gen) ~= 'string' or #gen ~= 8 then
  gen = ARGV[3]
  redis.call('SET', KEYS[2], gen, 'PX', ARGV[4])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('SET', KEYS[1], string.sub(ARGV[1], 1, 32) .. gen .. string.sub(ARGV[1], 41), 'PX', ARGV[2])
return 1
