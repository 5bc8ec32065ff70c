import sys
src = open(sys.argv[1]).read()
out = []; i = 0
while True:
    j = src.find('<<<', i)
    if j < 0: out.append(src[i:]); break
    # walk back over the kernel name (identifier with optional template args)
    k = j
    if src[k-1] == '>':
        depth = 0; k -= 1
        while True:
            c = src[k]
            if c == '>': depth += 1
            elif c == '<':
                depth -= 1
                if depth == 0: break
            k -= 1
    while k > 0 and (src[k-1].isalnum() or src[k-1] in '_:'): k -= 1
    name = src[k:j]
    e = src.find('>>>(', j)
    cfg = src[j+3:e]
    out.append(src[i:k]); out.append(f'::emu::launch(::emu::cfg({cfg}), {name}, ')
    i = e + 4
open(sys.argv[2], 'w').write(''.join(out))
