"""Hand-written English word lists for the recall detector (no downloads, no model).

``FUNCTION_WORDS``: closed-class words (articles, pronouns, prepositions, conjunctions,
auxiliaries, quantifiers) — never a fact, whatever their case.
``COMMON_WORDS``: frequent open-class words (verbs, nouns, adjectives, adverbs) that say how
something is said rather than which fact it is. A lowercase word in neither list, and long
enough, counts as *rare*: likely a domain term carrying a fact ("photosynthesis", "mitochondria").
Words are matched after :func:`stem`, so list base forms.
"""

from __future__ import annotations

FUNCTION_WORDS = frozenset("""
a an the this that these those there here
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves one ones oneself
who whom whose which what whatever whoever whichever when where why how whether
and or but nor so yet for if then than else because although though while whereas unless until since
as at by in on of off to from into onto upon with within without about above below under over
across along among amongst around before after behind beneath beside besides between beyond during
except inside outside near through throughout toward towards via per against despite like unlike
be am is are was were been being have has had having do does did doing done
will would shall should can could may might must ought
not no yes nope none nothing nobody noone nowhere never always often sometimes usually
all any both each either neither every everyone everybody everything everywhere few many much more most
less least several some someone somebody something somewhere such same other others another
own only also too very just even still already again ever quite rather almost enough
up down out away back forth now then today tomorrow yesterday
s t d ll ve re m o
""".split())

COMMON_WORDS = frozenset("""
able accept access according account achieve act action active activity actual actually add addition
address admit adult affect afraid age agency agent ago agree agreement ahead aid aim air allow
alone alright amount analysis ancient animal announce annual answer anybody anymore anyone anything
anyway apart appear apply approach appropriate area argue argument arm army arrive art article artist
ask assume attack attempt attend attention audience author available avoid aware award bad bag ball
bank bar base basic basis bear beat beautiful beauty become bed begin beginning behavior believe
benefit best better big bill bit black blood blue board boat body book born borrow boss bottom box
boy brain branch break bridge brief bright bring broad brother brown budget build building burn
business busy buy call calm camera campaign capital car card care career careful carry case cat catch
cause cell center central century certain certainly chair challenge chance change character charge
cheap check chemical chief child choice choose church circle citizen city civil claim class classic
clean clear clearly climb clock close closed clothes cloud club coast cold collect college color
come comment common community company compare complete completely computer concern condition
conference confirm consider contain continue control cook cool copy corner correct cost country
couple course court cover create crime cross crowd cry culture cup current currently customer cut
daily damage dance danger dark data date daughter day dead deal dear death decade decide decision
deep defense degree deliver demand department depend describe design detail determine develop
development die difference different difficult dinner direct direction director discover discuss
discussion disease do doctor dog door double doubt draw dream dress drink drive drop dry due early
earn earth easily east easy eat economic economy edge education effect effort eight eighth either
election electric element eleven else employee end energy enjoy enough enter entire environment
equal especially establish estimate event eventually evidence exact exactly example exist expect
experience expert explain express eye face fact factor fail fair fall false family famous far farm
fast father fear feature feel feeling field fifth fifty fight figure fill film final finally find
fine finger finish fire firm first fish five flat floor fly focus follow food foot force foreign
forget form former forward four fourth free fresh friend front full fully fun function fund future
game garden gas general generally get girl give glad glass go goal gold good government great green
ground group grow growth guess gun guy hair half hall hand handle hang happen happy hard head health
hear heart heat heavy height hello help high history hit hold hole holiday home hope horse hospital
hot hotel hour house however huge human hundred husband idea identify image imagine impact important
improve include including increase indeed indicate individual industry information inside instead
interest interesting international interview introduce invest involve island issue item job join
joke journey judge jump keep key kid kill kind king kitchen know knowledge lack lady lake land
language large last late later laugh law lay lead leader learn leave left leg legal lesson let letter
level lie life light likely limit line list listen little live local long look lose loss lot love
low lucky machine main mainly maintain major make man manage manager manner mark market marriage
matter mean meaning measure media meet meeting member memory mention message metal method middle
mile military milk million mind minute miss mission model modern moment money month moon morning
mother mountain mouth move movie music name nation national natural nature near nearly necessary
need network new news next nice night nine ninth noise north note notice novel number object
obvious obviously occur offer office officer official oil ok okay old once open operation
opinion opportunity option order ordinary organization original outcome page pain paint paper parent
park part particular particularly partner party pass past patient pattern pay peace people perfect
perform perhaps period person personal phone photo physical pick picture piece place plan planet plant
play player please plenty point police policy political poor popular population position positive
possible post pound power practice prefer prepare present president press pressure pretty prevent
price private probably problem process produce product production professional program project
promise proper property protect prove provide public pull purpose push put quality question quick
quickly quiet race radio rain raise range rate reach read ready real reality realize really reason
receive recent recently recognize record red reduce reflect region relate relationship release remain
remember remove repeat replace reply report represent require research resource respond response
rest result return reveal rich ride right ring rise risk river road rock role room rule run safe
sale save say scene school science sea season seat second secret section security see seek seem
sell send sense serious serve service set seven seventh shake shape share sharp ship shoot shop short
shot show side sign significant similar simple simply since sing single sister sit site situation six
sixth size skill skin sky sleep slow slowly small smile snow social society soft soldier solution
solve son song soon sorry sort sound source south space speak special speech speed spend sport
spring staff stage stand standard star start state statement station stay step stick stone stop
store story straight strange street strength stress strong structure student study stuff style
subject success successful suddenly suffer suggest summer sun supply support suppose sure surface
surprise system table take talk task tax teach teacher team technology television tell ten tend
tenth term test thank thanks theory thing think third thirty thousand threat three time tiny title
together tonight top total touch tough town trade traditional train travel treat treatment tree trial
trip trouble true truth try turn twelve twenty two type understand unit university use useful usual
value various version view visit voice vote wait walk wall want war warm wash watch water way weak
wear weather week weight welcome well west white whole wide wife win wind window winter wish woman
wonder wood word work worker world worry worth write writer writing wrong yard yeah year yellow young
zero
called named known located found based largest smallest biggest highest longest main famous official
wrote written invented discovered painted composed founded directed sang built
employ boil freeze melt hire own keep pet bird lives living headquarter headquarters capital
contain consist belong arrive leave happen mention reply answer respond explain
bake clean cover fold fix hurt kick kiss knock lift mix pack plant pour print rent roll rub
sail shout sign skip slide smell spell spill spread stamp steal stretch swim switch taste tie
trust visit vote wake wander warn waste wave weigh whisper wipe wrap yell
afternoon evening weekend minute second hour january february
animal plant fruit vegetable flower seed leaf root stone metal wood paper glass plastic cloth
shirt shoe hat coat bread cake meat rice egg sugar salt tea coffee juice wine beer
chicken cow pig sheep goat duck mouse rabbit
mother father sister brother uncle aunt cousin baby grandmother grandfather
north south east west northern southern eastern western
fast slow hot cold warm cool wet dry loud quiet soft hard sweet sour bitter fresh
correct incorrect wrong right true false likely unlikely possible impossible
first second third last next previous final early late
please thanks sorry hello goodbye yes okay sure
compute calculate count sum total add subtract multiply divide equal larger smaller bigger plus minus times
question answer context fact facts step steps reason reasoning therefore thus hence so because
problem solution example result check verify given
billion trillion dollar percent cent price cost
""".split())


def stem(word: str) -> str:
    """A crude, deterministic stem: lowercase, no possessive, no plural / past / -ing / -ly ending."""
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.rstrip("'")
    for suffix, keep in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("ly", ""), ("s", "")):
        if len(w) > len(suffix) + 2 and w.endswith(suffix) and not w.endswith("ss"):
            return w[: -len(suffix)] + keep
    return w


def is_known(word: str) -> bool:
    """A function word or a common word (in any inflection the crude stemmer undoes)."""
    w = word.lower()
    if w in FUNCTION_WORDS or w in COMMON_WORDS:
        return True
    s = stem(w)
    return s in COMMON_WORDS or s + "e" in COMMON_WORDS or s in FUNCTION_WORDS
