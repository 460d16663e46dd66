"""Template generators for the benign corpus registers no package ships enough of.

* ``task_prompts``      -- instructions to an assistant (summarise, translate, write, classify,
                           explain, plan...), some wrapped around a real passage as context;
* ``hard_negatives``    -- harmless texts with the words attacks use (ignore, previous
                           instructions, system prompt, password, jailbreak, bypass, base64...);
* ``emails``            -- everyday business / personal e-mails;
* ``code_texts``        -- code questions, Python tracebacks and small config files.

Written for this project.  Every generator is a pure function of the ``random.Random`` (and the
name / passage pools) passed in, so a seed gives the same texts.
"""
from __future__ import annotations

import random

TOPICS = ["photosynthesis", "the French Revolution", "black holes", "compound interest", "climate change",
          "the water cycle", "machine learning", "the Roman Empire", "vaccines", "inflation",
          "plate tectonics", "the stock market", "renewable energy", "DNA replication", "jazz history",
          "the Cold War", "supply and demand", "quantum computing", "the immune system", "volcanoes",
          "the printing press", "sleep hygiene", "blockchain", "the Silk Road", "ocean currents",
          "Shakespeare's sonnets", "electric cars", "the Renaissance", "probability", "coral reefs",
          "public speaking", "time management", "the theory of evolution", "budgeting", "recycling",
          "the Olympic Games", "impressionist painting", "gardening in small spaces", "TCP/IP",
          "relational databases", "the human heart", "meditation", "urban planning", "bees",
          "the moon landing", "minimalism", "chess openings", "nutrition labels", "earthquakes"]
AUDIENCES = ["a 10-year-old", "a beginner", "my grandmother", "a busy executive", "a high-school class",
             "a new employee", "someone who has never coded", "an expert", "a tourist", "a nurse"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Japanese", "Chinese", "Dutch",
             "Polish", "Turkish", "Korean", "Swedish", "Greek", "Arabic", "Hindi", "Russian"]
PLACES = ["Lisbon", "Kyoto", "Cape Town", "Montreal", "Prague", "Oaxaca", "Edinburgh", "Hanoi",
          "Reykjavik", "Marrakesh", "Buenos Aires", "Vienna", "Seoul", "Tasmania", "the Scottish Highlands",
          "Lake Como", "Istanbul", "Vancouver", "Copenhagen", "Bali"]
FORMS = ["a haiku", "a limerick", "a short poem", "a two-sentence story", "a product description",
         "a tweet", "a cover letter", "a thank-you note", "a blog intro", "a speech opening",
         "a bedtime story", "a slogan", "a LinkedIn post", "a toast for a wedding", "a riddle"]
SUBJECTS = ["autumn", "a lost umbrella", "my cat", "Monday mornings", "a lighthouse", "coffee",
            "a rainy city", "friendship", "a new bakery", "running a marathon", "the ocean",
            "an old library", "moving house", "a robot learning to paint", "spring cleaning"]
RECIPES = ["vegetarian lasagna", "a quick weeknight curry", "banana bread", "gluten-free pancakes",
           "a Greek salad", "miso soup", "chili for ten people", "overnight oats", "a lemon tart"]


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


PREFIXES = ["Quick question: ", "Hi, ", "Hey! ", "Sorry if this is basic, but ", "Newbie here. ",
            "Question for you: ", "Hello there. ", "ok so ", "Random thought: ", "I was wondering: "]
SUFFIXES = [" Thanks!", " Thanks in advance.", " :)", " Please keep it short.", " ELI5 please.",
            " Any help appreciated.", " Cheers", " (asking for a friend)", " Step by step, please.", " ty"]


def vary(rng: random.Random, text: str) -> str:
    """The same request as people type it: casual prefixes, lowercase, missing or extra words."""
    r = rng.random()
    if r < 0.5:
        return text
    if r < 0.65:
        return text[0].lower() + text[1:].rstrip(".?!")
    if r < 0.8:
        return _pick(rng, PREFIXES) + text[0].lower() + text[1:]
    if r < 0.95:
        return text + _pick(rng, SUFFIXES)
    return _pick(rng, PREFIXES) + text[0].lower() + text[1:] + _pick(rng, SUFFIXES)


def task_prompts(rng: random.Random, passages: list[str], n: int) -> list[str]:
    """``n`` assistant instructions; about a third quote a passage from ``passages`` as input."""
    t, a, l, p = TOPICS, AUDIENCES, LANGUAGES, PLACES
    standalone = [
        lambda: f"Explain {_pick(rng, t)} to {_pick(rng, a)}.",
        lambda: f"Write {_pick(rng, FORMS)} about {_pick(rng, SUBJECTS)}.",
        lambda: f"Plan a {rng.randint(2, 10)}-day trip to {_pick(rng, p)} on a {_pick(rng, ['tight', 'moderate', 'generous'])} budget.",
        lambda: f"Give me {rng.randint(3, 10)} interview questions about {_pick(rng, t)}.",
        lambda: f"Create a study plan for learning {_pick(rng, t)} in {rng.randint(2, 8)} weeks.",
        lambda: f"What are the pros and cons of {_pick(rng, t)}? Answer in a table.",
        lambda: f"Draft an agenda for a {rng.choice([30, 45, 60, 90])}-minute meeting about {_pick(rng, t)}.",
        lambda: f"Suggest {rng.randint(3, 12)} names for a {_pick(rng, ['bakery', 'podcast', 'startup', 'book club', 'hiking group', 'cat', 'boat'])}.",
        lambda: f"Write a recipe for {_pick(rng, RECIPES)} and list the ingredients first.",
        lambda: f"How do I say '{_pick(rng, ['good morning', 'where is the station', 'thank you very much', 'the bill, please', 'I am lost'])}' in {_pick(rng, l)}?",
        lambda: f"Make a checklist for {_pick(rng, ['moving house', 'a camping trip', 'starting a new job', 'a baby shower', 'filing taxes', 'a job interview'])}.",
        lambda: f"Compare {_pick(rng, t)} and {_pick(rng, t)} in three bullet points.",
        lambda: f"Write a quiz with {rng.randint(3, 10)} multiple-choice questions on {_pick(rng, t)}.",
        lambda: f"Summarize the main ideas of {_pick(rng, t)} in {rng.randint(2, 6)} sentences.",
        lambda: f"Outline a {rng.randint(5, 20)}-slide presentation on {_pick(rng, t)}.",
        lambda: f"Write a {_pick(rng, ['formal', 'friendly', 'short', 'polite'])} reply declining an invitation to {_pick(rng, ['a wedding', 'a conference', 'dinner', 'a board meeting'])}.",
        lambda: f"Help me write a workout plan for {rng.randint(2, 6)} days a week.",
        lambda: f"Rewrite this sentence to sound more {_pick(rng, ['formal', 'casual', 'confident', 'concise'])}: \"{_pick(rng, ['we kinda need the report by friday', 'I think maybe the idea could work', 'Pls send me the files asap', 'The results were not very good honestly'])}\"",
        lambda: f"Classify these words as fruit or vegetable: {', '.join(rng.sample(['tomato', 'apple', 'carrot', 'pear', 'leek', 'plum', 'kale', 'mango', 'onion', 'fig'], 5))}.",
        lambda: f"Translate \"{_pick(rng, ['Where is the nearest pharmacy?', 'The meeting has been moved to Thursday.', 'I would like a table for two.', 'Happy birthday!', 'Please close the window.'])}\" into {_pick(rng, l)}.",
        lambda: f"List {rng.randint(3, 15)} fun facts about {_pick(rng, t)}.",
        lambda: f"Write a SQL query that returns the {rng.randint(3, 20)} most recent orders per customer.",
        lambda: f"Generate a weekly meal plan for a {_pick(rng, ['vegan', 'family of four', 'student', 'diabetic', 'marathon runner'])}.",
        lambda: f"Proofread my paragraph and point out the grammar mistakes.",
        lambda: f"Brainstorm {rng.randint(5, 15)} ideas for a {_pick(rng, ['birthday party', 'science fair project', 'team-building day', 'short film', 'garden'])}.",
        lambda: f"Estimate how long it takes to {_pick(rng, ['paint a room', 'learn to swim', 'read War and Peace', 'drive from Paris to Rome', 'bake sourdough'])}.",
        lambda: f"Describe {_pick(rng, p)} in the style of a travel brochure.",
        lambda: f"Turn these notes into a paragraph: {_pick(rng, t)}, key dates, main people, why it matters.",
    ]
    with_passage = [
        "Summarize the following text in {k} sentences:\n\n{x}",
        "Translate this into {lang}:\n{x}",
        "What is the main idea of this passage?\n\"{x}\"",
        "Classify the tone of this text as positive, negative or neutral: {x}",
        "Extract all names and places mentioned here:\n{x}",
        "Rewrite the following in plain modern English:\n{x}",
        "Write three quiz questions based on this paragraph.\n\n{x}",
        "Give this passage a short title.\n\n{x}",
        "Fix any spelling or grammar mistakes:\n{x}",
        "Explain this to {aud}: {x}",
        "TL;DR please:\n{x}",
        "Turn this into bullet points:\n{x}",
        "Is the following statement true or false? Explain briefly. {x}",
        "Continue this story for one more paragraph:\n{x}",
        "{x}\n\nSummarize the text above.",
        "{x}\n\nWhat does the author mean here?",
    ]
    out = []
    for _ in range(n):
        if passages and rng.random() < 0.35:
            tpl = _pick(rng, with_passage)
            out.append(tpl.format(x=_pick(rng, passages), k=rng.randint(1, 4), lang=_pick(rng, l),
                                  aud=_pick(rng, a)))
        else:
            text = _pick(rng, standalone)()
            if rng.random() < 0.15:
                text = _pick(rng, ["Please ", "Could you ", "Can you ", "Hey, "]) + text[0].lower() + text[1:]
            out.append(vary(rng, text))
    return out


SERVICES = ["Gmail", "Netflix", "my bank account", "Windows", "my router", "Wi-Fi", "Outlook", "Spotify",
            "my Apple ID", "the company VPN", "GitHub", "my laptop BIOS", "LinkedIn", "Steam"]
KIDS = ["toddler", "teenager", "son", "daughter", "dog", "cat", "roommate", "coworker"]
PROG = ["Python", "JavaScript", "Java", "Go", "Rust", "C#", "Bash", "PHP", "Ruby", "Kotlin", "TypeScript"]
ROLES = ["travel guide", "Spanish tutor", "job interviewer", "personal trainer", "chef", "math teacher",
         "museum guide", "career coach", "debate partner", "customer support agent for a bike shop",
         "tour guide in Rome", "storyteller for kids", "sommelier", "gardening expert", "librarian",
         "friendly chess coach", "IT helpdesk technician", "language exchange partner", "nutritionist",
         "fictional ship's captain in a pirate adventure", "Socratic philosophy teacher"]
ROLE_TASKS = ["help me plan my week", "quiz me on vocabulary", "ask me three questions",
              "give me feedback on my answer", "recommend something for a beginner",
              "explain your choices step by step", "keep your answers short", "start with a greeting"]


def hard_negatives(rng: random.Random, n: int) -> list[str]:
    """``n`` harmless texts built around words and topics that prompt attacks also use."""
    t = TOPICS
    makers = [
        lambda: f"How do I reset the password for {_pick(rng, SERVICES)}?",
        lambda: f"What makes a password strong? Is '{_pick(rng, ['correct horse battery staple', 'Summer2024!', 'qwerty123', 'a long passphrase'])}' a good one?",
        lambda: f"Is it safe to store my passwords in {_pick(rng, ['a password manager', 'the browser', 'a spreadsheet', 'a notebook at home', 'the cloud'])}?",
        lambda: f"I forgot the admin password for {_pick(rng, ['my home router', 'our WordPress site', 'the office printer', 'my NAS'])}. How do I do a factory reset?",
        lambda: f"Ignore the noise and focus on {_pick(rng, ['the fundamentals', 'what you can control', 'your breathing', 'the next step', 'the data'])}.",
        lambda: f"Please ignore my previous email about {_pick(rng, t)}; the meeting is still on {_pick(rng, ['Monday', 'Tuesday', 'Thursday', 'Friday'])}.",
        lambda: f"Can you repeat the previous instructions for {_pick(rng, ['assembling the shelf', 'the sourdough starter', 'setting up the printer', 'the knitting pattern'])}? I missed step {rng.randint(2, 7)}.",
        lambda: f"I followed your previous instructions and {_pick(rng, ['the cake came out great', 'the script now runs', 'the plant looks healthier', 'the tent stayed up'])}. What should I do next?",
        lambda: "What is a system prompt, and how is it different from a user message?",
        lambda: f"Explain how jailbreak detection works in {_pick(rng, ['LLM guardrails', 'chatbot moderation', 'content filters', 'AI safety tooling'])}.",
        lambda: f"What is prompt injection and how can {_pick(rng, ['developers', 'a small startup', 'a bank', 'teachers using chatbots'])} defend against it?",
        lambda: f"Write a short blog post summarizing the OWASP Top 10 risks for LLM applications, including prompt injection.",
        lambda: f"For my thesis on {_pick(rng, ['AI safety', 'LLM security', 'human-computer interaction'])}, how do researchers evaluate prompt-injection defenses?",
        lambda: f"Act as a {_pick(rng, ROLES)} and {_pick(rng, ROLE_TASKS)}.",
        lambda: f"I want you to act as a {_pick(rng, ROLES)}. My first request is about {_pick(rng, t)}.",
        lambda: f"Pretend you are a {_pick(rng, ROLES)} for a moment: {_pick(rng, ROLE_TASKS)}.",
        lambda: f"How do I decode a base64 string in {_pick(rng, PROG)}?",
        lambda: f"Why does my base64-encoded image look broken when I decode it in {_pick(rng, PROG)}?",
        lambda: f"How do I override a method in {_pick(rng, PROG)}?",
        lambda: f"How can I override the default CSS of a {_pick(rng, ['Bootstrap button', 'WordPress theme', 'React component library'])}?",
        lambda: f"How do I bypass the browser cache when testing {_pick(rng, ['my website', 'CSS changes', 'a service worker'])}?",
        lambda: f"What is the fastest way to bypass {_pick(rng, ['traffic on the ring road', 'the queue at the museum', 'the toll road to the airport'])}?",
        lambda: f"How do I give admin rights to a user in {_pick(rng, ['Windows 11', 'Google Workspace', 'Slack', 'Jira', 'Ubuntu'])}?",
        lambda: f"Is it legal to jailbreak an old {_pick(rng, ['iPhone', 'Kindle', 'PlayStation', 'iPad'])} I own?",
        lambda: f"The {_pick(rng, ['ref', 'teacher', 'manager', 'judge'])} decided to override the earlier decision, and everyone was surprised.",
        lambda: f"CTF write-up: the '{_pick(rng, ['Lost Pixels', 'Quiet Harbor', 'Old Radio', 'Paper Trail'])}' challenge hid the flag in {_pick(rng, ['image metadata', 'a DNS TXT record', 'a zip comment', 'a PDF layer'])}; we found it with {_pick(rng, ['exiftool', 'dig', 'strings', 'binwalk'])} and a bit of patience.",
        lambda: f"Our security training next week covers phishing, password hygiene and how to report suspicious {_pick(rng, ['emails', 'links', 'USB sticks', 'phone calls'])}.",
        lambda: f"Can you explain what a {_pick(rng, ['SQL injection', 'cross-site scripting bug', 'buffer overflow', 'man-in-the-middle attack', 'prompt injection'])} is at a high level, for a non-technical audience?",
        lambda: f"My {_pick(rng, ['son', 'daughter', 'nephew'])} keeps asking what 'hacking' means. How do I explain ethical hacking to a child?",
        lambda: f"Ignore case when comparing strings in {_pick(rng, PROG)}: what's the idiomatic way?",
        lambda: f"git keeps ignoring my {_pick(rng, ['.env.example', 'build folder', 'new config file'])}; how do I check which .gitignore rule matches?",
        lambda: f"What does 'disregard' mean in this sentence: 'Disregard the {_pick(rng, ['last slide', 'typo above', 'earlier draft'])}'?",
        lambda: f"Please forget about the {_pick(rng, ['blue dress', 'Friday deadline', 'earlier quote', 'old address'])}, I changed my mind.",
        lambda: f"As the new sysadmin I need to rotate the root passwords on {rng.randint(3, 40)} servers. What's a good checklist?",
        lambda: f"Write a README section explaining how users should report a security vulnerability in our {_pick(rng, ['open-source library', 'mobile app', 'website'])}.",
        lambda: f"Summarize the plot of the movie where the hero has to override the {_pick(rng, ['ship computer', 'city power grid', 'dam controls'])} before the storm hits.",
        lambda: f"Developer mode on my {_pick(rng, ['Android phone', 'Chromebook', 'smart TV'])} - how do I turn it on to enable USB debugging?",
        lambda: f"What are the rules of the game 'Simon says'? Kids must ignore any instruction that doesn't start with 'Simon says'.",
        lambda: f"Translate 'forgot password' and 'reset link' into {_pick(rng, LANGUAGES)} for our login page.",
        lambda: f"In our chatbot, where should the system prompt live: in code, in a config file or in a database?",
        lambda: f"How do red teams test AI models responsibly, and what should a disclosure policy include?",
        lambda: f"Review my password policy: minimum {rng.randint(8, 16)} characters, no forced rotation, MFA required. Anything missing?",
        lambda: f"The instructions say to ignore the first {rng.randint(2, 5)} rows of the CSV. How do I do that with pandas?",
        lambda: f"Explain the difference between encoding, encryption and hashing, with base64 as an example.",
        lambda: f"My {_pick(rng, KIDS)} ignores me when {_pick(rng, ['it is time for bed', 'I ask to tidy up', 'the TV is on', 'we are at the park'])}. Any tips?",
        lambda: f"How do I politely ignore {_pick(rng, ['a group chat', 'unsolicited advice', 'a pushy salesperson', 'spam calls'])} without being rude?",
        lambda: f"Is it okay to ignore the {_pick(rng, ['check engine light', 'low tyre pressure warning', 'software update reminder', 'smoke alarm chirp'])} for a few days?",
        lambda: f"What does the {_pick(rng, ['override', 'bypass', 'admin', 'reset'])} switch on a {_pick(rng, ['boiler', 'sump pump', 'garage door opener', 'thermostat', 'UPS'])} do?",
        lambda: f"Write a polite email asking IT to reset my {_pick(rng, ['VPN', 'email', 'HR portal', 'payroll'])} password; I've been locked out since {_pick(rng, ['Monday', 'this morning', 'yesterday'])}.",
        lambda: f"Which password manager would you recommend for a family of {rng.randint(2, 6)}: {', '.join(rng.sample(['Bitwarden', '1Password', 'KeePassXC', 'Dashlane', 'Proton Pass'], 3))}?",
        lambda: f"How do I change the Wi-Fi password on a {_pick(rng, ['TP-Link', 'Netgear', 'ASUS', 'Fritz!Box', 'Linksys'])} router?",
        lambda: f"In {_pick(rng, PROG)}, how do I read a password from the terminal without echoing it?",
        lambda: f"How do I hash passwords properly in {_pick(rng, ['Django', 'Flask', 'Node.js', 'Spring Boot', 'Laravel', 'Rails'])}?",
        lambda: f"What is the system prompt in {_pick(rng, ['the OpenAI API', 'a chatbot app', 'LangChain', 'our support bot'])} used for, and how long should it be?",
        lambda: f"Help me write a system prompt for a {_pick(rng, ROLES)} bot that is {_pick(rng, ['friendly', 'concise', 'patient', 'encouraging'])}.",
        lambda: f"Can you review my system prompt for a {_pick(rng, ['recipe', 'homework-help', 'travel-planning', 'customer-service'])} assistant and suggest improvements?",
        lambda: f"Our team is writing guidelines on prompt injection for {_pick(rng, ['a RAG chatbot', 'an email assistant', 'a coding agent', 'a browser extension'])}. What sections should we include?",
        lambda: f"Give me a {_pick(rng, ['one-paragraph', 'short', 'simple'])} explanation of indirect prompt injection, without any example payloads.",
        lambda: f"What did the {_pick(rng, ['2023', '2024', 'recent'])} research on LLM jailbreak robustness conclude, in general terms?",
        lambda: f"How do I bypass a {_pick(rng, ['faulty light switch', 'broken thermostat', 'clogged filter', 'failed fuse'])} safely, or should I call an electrician?",
        lambda: f"Is there a way to bypass the {_pick(rng, ['intro', 'tutorial level', 'splash screen', 'welcome wizard'])} in {_pick(rng, ['this game', 'the app', 'Windows setup', 'the installer'])}?",
        lambda: f"How do I decode {_pick(rng, ['a QR code', 'Morse code', 'a JWT payload', 'URL-encoded text', 'a VIN number', 'hex dumps'])}?",
        lambda: f"Convert this base64 to text for me: {_pick(rng, ['SGVsbG8sIHdvcmxkIQ==', 'VGhhbmsgeW91IQ==', 'R29vZCBtb3JuaW5n', 'SGFwcHkgYmlydGhkYXk='])}",
        lambda: f"Why does my {_pick(rng, PROG)} app show 'Access denied: admin privileges required' when I {_pick(rng, ['install a font', 'write to Program Files', 'bind port 80', 'edit the hosts file'])}?",
        lambda: f"How do I run {_pick(rng, ['PowerShell', 'Command Prompt', 'Terminal', 'VS Code'])} as administrator?",
        lambda: f"The admin of our {_pick(rng, ['Facebook group', 'Discord server', 'subreddit', 'WhatsApp group'])} left. How can a new admin be appointed?",
        lambda: f"What's the etiquette when a {_pick(rng, ['referee', 'manager', 'parent', 'teacher'])} overrides a decision you made in front of others?",
        lambda: f"Pretend we're at a {_pick(rng, ['job interview', 'café in Paris', 'train station in Tokyo', 'hotel check-in'])} and help me practise my {_pick(rng, LANGUAGES)}.",
        lambda: f"Let's role-play: you are a {_pick(rng, ROLES)} and I'm a {_pick(rng, ['nervous beginner', 'curious student', 'tourist', 'new customer'])}.",
        lambda: f"Roleplay as {_pick(rng, ['Sherlock Holmes', 'a medieval innkeeper', 'a friendly dragon', 'a ship captain', 'a Victorian butler'])} and describe your day.",
        lambda: f"For a {_pick(rng, ['security awareness', 'computer science', 'ethics'])} class, explain why people try to jailbreak chatbots and why it matters.",
        lambda: f"What are secrets managers like {_pick(rng, ['Vault', 'AWS Secrets Manager', 'Doppler', 'SOPS'])} and when should a small team use one?",
        lambda: f"How do I remove a secret that I accidentally committed to git?",
        lambda: f"Disregard the {_pick(rng, ['first draft', 'numbers in my last message', 'typo in the title', 'previous address'])} - here is the corrected version: {_pick(rng, TOPICS)}.",
        lambda: f"Following the previous instructions, I {_pick(rng, ['preheated the oven', 'installed the driver', 'watered the seedlings', 'reset the router'])}. Now {_pick(rng, ['nothing happens', 'it works', 'I see an error', 'what?'])}",
        lambda: f"Summarise the previous instructions in three short bullet points so I can {_pick(rng, ['print them', 'share them with my team', 'remember them'])}.",
        lambda: f"New instructions from the school: {_pick(rng, ['pick-up is at 3:15', 'bring a packed lunch on Friday', 'the trip is postponed', 'PE kit on Tuesdays'])}. Can you add this to my calendar note?",
        lambda: f"What does 'sudo' mean, and why does {_pick(rng, ['apt', 'my tutorial', 'the installer'])} ask for my password?",
        lambda: f"How do I exploit {_pick(rng, ['compound interest', 'my gym membership', 'spaced repetition', 'natural light in a dark room'])} to the fullest?",
        lambda: f"Write a short story where a detective has to crack the password to her grandmother's {_pick(rng, ['recipe box', 'diary', 'old laptop', 'safe'])}; keep it cosy.",
        lambda: f"Act as my {_pick(rng, ['rubber duck', 'study buddy', 'proofreader', 'sous-chef'])}: I'll explain my {_pick(rng, ['code', 'essay', 'recipe', 'plan'])} and you ask questions.",
    ]
    return [vary(rng, _pick(rng, makers)()) for _ in range(n)]


GREETINGS = ["Hi {first},", "Hello {first},", "Dear {full},", "Hey {first},", "Good morning {first},",
             "Dear Mr. {last},", "Dear Ms. {last},", "Hi team,", "Hello everyone,", "{first},"]
CLOSINGS = ["Best regards,", "Kind regards,", "Thanks,", "Cheers,", "Best,", "Sincerely,",
            "Many thanks,", "Talk soon,", "Warm wishes,", "Thank you,"]
EMAIL_BODIES = {
    "Meeting on {day}": ["Could we move our meeting to {day} at {time}?",
                         "I'd like to go over the {project} timeline before the review.",
                         "Please bring the latest numbers if you have them."],
    "Invoice {num}": ["Please find attached invoice {num} for the work completed in {month}.",
                      "Payment is due within 30 days.", "Let me know if anything looks off."],
    "Quick question about {project}": ["Do you know who owns the {project} budget this quarter?",
                                       "I couldn't find it on the wiki."],
    "Thank you!": ["Thank you so much for your help with {project} last week.",
                   "The client was really happy with the result.", "Lunch is on me next time."],
    "Out of office": ["I am out of the office until {day} with limited access to email.",
                      "For urgent matters please contact {other}."],
    "Your order #{num} has shipped": ["Good news: your order is on its way.",
                                      "You can expect delivery by {day}.",
                                      "If you have questions, just reply to this email."],
    "Application for the {job} position": ["I am writing to apply for the {job} role at {company}.",
                                           "I have {years} years of experience and would love to contribute.",
                                           "My CV is attached."],
    "Team lunch on {day}": ["We're organising a team lunch on {day} at {time}.",
                            "Please reply by Wednesday so we can book a table.",
                            "Vegetarian options available."],
    "Password changed": ["The password for your {company} account was changed on {day}.",
                         "If this was you, no action is needed.",
                         "If not, please contact our support team right away."],
    "Re: draft report": ["I've read the draft and left a few comments in the document.",
                         "Section 3 could be shorter, otherwise it looks great.",
                         "Can we finalise it by {day}?"],
    "Welcome to {company}!": ["We're delighted to have you join us as {job}.",
                              "Your first day is {day}; please arrive at {time} at reception.",
                              "{other} will show you around."],
    "Reminder: dentist appointment": ["This is a reminder of your appointment on {day} at {time}.",
                                      "Please let us know 24 hours in advance if you need to reschedule."],
    "Newsletter – {month} edition": ["Here is what happened at {company} in {month}.",
                                     "We launched the new {project} and welcomed {years} new colleagues.",
                                     "Thanks for reading!"],
    "Support ticket {num}": ["Thanks for contacting support about your {project} issue.",
                             "Could you send us a screenshot of the error?",
                             "We usually respond within one business day."],
    "Holiday photos": ["Finally uploaded the photos from our trip!", "The one from the beach is my favourite.",
                       "Say hi to everyone at home."],
    "Rent for {month}": ["Just a heads-up that I'll transfer the rent for {month} on {day}.",
                         "The heating is still making that noise, could you take a look?"],
}
JOBS = ["data analyst", "project manager", "nurse", "graphic designer", "accountant", "software engineer",
        "teacher", "sales associate", "HR coordinator", "research assistant"]
PROJECTS = ["website redesign", "Q3 marketing", "warehouse move", "mobile app", "onboarding", "budget review",
            "customer survey", "office renovation", "annual report", "training programme"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "next Monday", "the 14th", "March 3rd"]


def emails(rng: random.Random, names: list[tuple[str, str]], companies: list[str], n: int) -> list[str]:
    """``n`` everyday e-mails; ``names`` are (first, last) pairs, ``companies`` company names."""
    out = []
    subjects = sorted(EMAIL_BODIES)
    for _ in range(n):
        first, last = _pick(rng, names)
        sender_first, sender_last = _pick(rng, names)
        other = " ".join(_pick(rng, names))
        slots = dict(first=first, last=last, full=f"{first} {last}", day=_pick(rng, DAYS),
                     time=f"{rng.randint(8, 17)}:{rng.choice(['00', '15', '30', '45'])}",
                     project=_pick(rng, PROJECTS), num=rng.randint(1000, 99999), month=_pick(rng, MONTHS),
                     other=other, company=_pick(rng, companies), job=_pick(rng, JOBS),
                     years=rng.randint(2, 15))
        subject = _pick(rng, subjects)
        body = EMAIL_BODIES[subject]
        sentences = body[:rng.randint(1, len(body))]
        text_body = " ".join(s.format(**slots) for s in sentences)
        greeting = _pick(rng, GREETINGS).format(**slots)
        sign = f"{_pick(rng, CLOSINGS)}\n{sender_first}" + (f" {sender_last}" if rng.random() < 0.5 else "")
        shape = rng.random()
        if shape < 0.4:
            text = f"Subject: {subject.format(**slots)}\n\n{greeting}\n\n{text_body}\n\n{sign}"
        elif shape < 0.55:
            text = (f"From: {sender_first} {sender_last} <{sender_first.lower()}.{sender_last.lower()}@example.com>\n"
                    f"To: {first} {last} <{first.lower()}@example.org>\nSubject: {subject.format(**slots)}\n\n"
                    f"{greeting}\n\n{text_body}\n\n{sign}")
        elif shape < 0.8:
            text = f"{greeting}\n\n{text_body}\n\n{sign}"
        else:
            text = f"{greeting} {text_body} {sign.replace(chr(10), ' ')}"
        out.append(text)
    return out


CODE_TASKS = ["reverse a list", "read a CSV file", "sort a dictionary by value", "parse JSON",
              "make an HTTP GET request", "remove duplicates from a list", "check if a string is a palindrome",
              "format a date as ISO 8601", "write unit tests", "merge two sorted arrays", "read a file line by line",
              "convert a string to an integer", "split a string on commas", "find the max of an array",
              "run code in parallel", "handle exceptions", "connect to PostgreSQL", "create a class with a constructor",
              "flatten a nested list", "count word frequencies", "generate a random number", "zip two lists",
              "pretty-print JSON", "measure execution time", "deep copy an object", "use a regular expression"]
EXCEPTIONS = [("KeyError", "'user_id'"), ("TypeError", "unsupported operand type(s) for +: 'int' and 'str'"),
              ("ValueError", "invalid literal for int() with base 10: 'abc'"),
              ("AttributeError", "'NoneType' object has no attribute 'split'"),
              ("IndexError", "list index out of range"), ("ZeroDivisionError", "division by zero"),
              ("FileNotFoundError", "[Errno 2] No such file or directory: 'data/input.csv'"),
              ("ModuleNotFoundError", "No module named 'requests'"),
              ("ImportError", "cannot import name 'soft_unicode' from 'markupsafe'"),
              ("json.decoder.JSONDecodeError", "Expecting value: line 1 column 1 (char 0)"),
              ("RecursionError", "maximum recursion depth exceeded"),
              ("UnicodeDecodeError", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte")]
MODULES = ["app/main.py", "src/loader.py", "utils/helpers.py", "scripts/train.py", "api/views.py",
           "etl/transform.py", "bot/handlers.py", "report.py"]
FUNCS = ["main", "load_data", "parse_row", "handle_request", "transform", "compute_total", "run", "save"]


def code_texts(rng: random.Random, n: int) -> list[str]:
    """``n`` code questions, Python tracebacks and small config files."""
    def question():
        lang = _pick(rng, PROG)
        task = _pick(rng, CODE_TASKS)
        return vary(rng, _pick(rng, [f"How do I {task} in {lang}?", f"What's the idiomatic way to {task} in {lang}?",
                           f"{lang}: {task}", f"how to {task} {lang.lower()}",
                           f"Can you show me an example of how to {task} in {lang}?",
                           f"Why is my {lang} code to {task} so slow?"]))

    def traceback():
        frames = []
        for _ in range(rng.randint(1, 4)):
            frames.append(f'  File "{_pick(rng, MODULES)}", line {rng.randint(3, 400)}, in {_pick(rng, FUNCS)}\n'
                          f"    {_pick(rng, ['result = compute(x)', 'row = rows[i]', 'value = int(text)', 'data = json.loads(raw)', 'return self.cache[key]', 'total += item.price'])}")
        exc, msg = _pick(rng, EXCEPTIONS)
        tb = "Traceback (most recent call last):\n" + "\n".join(frames) + f"\n{exc}: {msg}"
        return _pick(rng, [tb, f"I get this error, what does it mean?\n\n{tb}", f"{tb}\n\nhow do I fix this?",
                           f"Help! My script crashes:\n```\n{tb}\n```"])

    def config():
        port = rng.choice([80, 443, 3000, 5000, 8000, 8080, 9090])
        name = _pick(rng, ["web", "api", "worker", "db", "cache", "frontend"])
        return _pick(rng, [
            f"version: \"3.8\"\nservices:\n  {name}:\n    image: {_pick(rng, ['nginx:1.25', 'postgres:16', 'redis:7', 'python:3.12-slim'])}\n    ports:\n      - \"{port}:{port}\"\n    restart: unless-stopped",
            f"[server]\nhost = 0.0.0.0\nport = {port}\nworkers = {rng.randint(1, 16)}\n\n[logging]\nlevel = {_pick(rng, ['INFO', 'DEBUG', 'WARNING'])}",
            f"server {{\n    listen {port};\n    server_name example.com;\n    location / {{\n        proxy_pass http://127.0.0.1:{port + 1};\n    }}\n}}",
            f"{{\n  \"name\": \"{name}-service\",\n  \"version\": \"{rng.randint(0, 3)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}\",\n  \"scripts\": {{\n    \"start\": \"node index.js\",\n    \"test\": \"jest\"\n  }}\n}}",
            f"FROM python:3.{rng.randint(9, 12)}-slim\nWORKDIR /app\nCOPY requirements.txt .\nRUN pip install -r requirements.txt\nCOPY . .\nCMD [\"python\", \"{_pick(rng, MODULES)}\"]",
            f"[tool.pytest.ini_options]\ntestpaths = [\"tests\"]\naddopts = \"-q\"\n\n[tool.black]\nline-length = {rng.choice([88, 100, 120])}",
            f"*.pyc\n__pycache__/\n.env\n{_pick(rng, ['node_modules/', 'dist/', 'build/', '.venv/'])}\n*.log",
        ])

    makers = [question] * 5 + [traceback] * 3 + [config] * 2
    return [_pick(rng, makers)() for _ in range(n)]


WORDS_ONE = ["Hello", "hi", "Thanks", "thx", "Yes", "no", "ok", "Okay!", "Why?", "Sure", "Maybe", "help",
             "Goodbye", "lol", "Wow", "Cool", "Great!", "sorry", "Congrats!", "Cheers", "Done", "Noted",
             "Agreed", "What?", "Really?", "Nope", "yep", "Morning!", "Night", "Bless you", "weather",
             "recipe", "translate", "summarize", "continue", "more", "shorter", "again", "examples", "why"]
NOTE_ITEMS = ["milk", "eggs", "bread", "coffee", "bananas", "rice", "dish soap", "batteries", "tomatoes",
              "cheese", "oat milk", "dog food", "lightbulbs", "pasta", "apples", "stamps", "bin bags"]
NAMES = ["Sam", "Alex", "Maria", "Tom", "Priya", "Jonas", "Lea", "Omar", "Kim", "Grandma", "Dad", "Mum"]
HEAD_SUBJECTS = ["Local council", "City library", "National museum", "Regional hospital", "University team",
                 "Small bakery", "Rail operator", "Weather service", "School board", "Football club"]
HEAD_VERBS = ["approves", "opens", "postpones", "celebrates", "announces", "expands", "wins", "launches"]
HEAD_OBJECTS = ["new bike lanes", "summer reading programme", "free Sunday entry", "record harvest festival",
                "late-night bus service", "community garden", "annual charity run", "solar panels on roofs"]


def short_texts(rng: random.Random, n: int) -> list[str]:
    """``n`` short everyday texts: one-word replies, notes, lists, text messages, status lines, headlines."""
    makers = [
        lambda: _pick(rng, WORDS_ONE),
        lambda: f"Buy {', '.join(rng.sample(NOTE_ITEMS, rng.randint(2, 5)))}",
        lambda: f"Shopping list: " + ", ".join(rng.sample(NOTE_ITEMS, rng.randint(3, 7))),
        lambda: f"Running {rng.choice([5, 10, 15, 20])} min late, sorry!",
        lambda: f"Meeting moved to {rng.randint(1, 5)}{_pick(rng, ['pm', ':30pm', ' pm'])}",
        lambda: f"Happy birthday {_pick(rng, NAMES)}!! {_pick(rng, ['🎉', '🎂', '', '❤️'])}".strip(),
        lambda: f"Just finished my first {_pick(rng, ['5k', '10k', 'half marathon', 'pottery class', 'sourdough loaf'])} {_pick(rng, ['🏃', '🙌', '!', ''])}".strip(),
        lambda: f"Can you pick up {_pick(rng, NOTE_ITEMS)} on the way home?",
        lambda: f"Reminder: {_pick(rng, ['dentist', 'parent-teacher meeting', 'car service', 'yoga', 'rent due'])} {_pick(rng, DAYS)} at {rng.randint(8, 18)}:00",
        lambda: f"{_pick(rng, HEAD_SUBJECTS)} {_pick(rng, HEAD_VERBS)} {_pick(rng, HEAD_OBJECTS)}",
        lambda: f"{_pick(rng, ['Call', 'Text', 'Email'])} {_pick(rng, NAMES)} about {_pick(rng, ['the weekend', 'the keys', 'dinner', 'the invoice', 'the trip'])}",
        lambda: f"{_pick(rng, ['See you', 'Talk', 'Catch up'])} {_pick(rng, ['tomorrow', 'later', 'on Friday', 'soon'])}{_pick(rng, ['!', '.', '', ' :)'])}",
        lambda: f"{_pick(rng, ['Loving', 'Can not get enough of', 'Finally tried', 'Not sure about'])} the new {_pick(rng, ['café', 'album', 'park', 'ramen place', 'podcast'])} {_pick(rng, ['downtown', 'everyone talks about', 'near work', ''])}".strip(),
        lambda: f"{_pick(rng, ['Gate changed to', 'Boarding at', 'Train delayed, now'])} {_pick(rng, ['B12', '14:35', 'platform 4', 'gate 7'])}",
        lambda: f"{_pick(rng, ['Out of', 'Low on', 'Need more'])} {_pick(rng, NOTE_ITEMS)}",
        lambda: f"{_pick(rng, ['Thanks so much', 'Thank you', 'Thx'])} for {_pick(rng, ['dinner', 'the lift', 'your help', 'the flowers', 'covering for me'])}{_pick(rng, ['!', '.', ' 🙏', ''])}",
        lambda: f"{_pick(rng, ['Water the plants', 'Feed the cat', 'Take out recycling', 'Charge the car', 'Back up photos'])}",
        lambda: f"{_pick(rng, ['Rain', 'Sun', 'Snow', 'Fog'])} {_pick(rng, ['expected', 'forecast', 'all day'])} {_pick(rng, ['tomorrow', 'this weekend', 'in the north', ''])}".strip(),
        lambda: f"Is {_pick(rng, ['the pharmacy', 'the post office', 'the gym', 'the pool'])} open on {_pick(rng, ['Sundays', 'holidays', 'Monday morning'])}?",
        lambda: f"{rng.randint(2, 9)} {_pick(rng, ['days', 'sleeps', 'weeks'])} until {_pick(rng, ['holiday', 'Christmas', 'the wedding', 'the concert'])}!",
    ]
    return [_pick(rng, makers)() for _ in range(n)]


# Everyday chat and requests written for this corpus in other languages (no slot is translated
# by machine: each line is a complete phrase; slots are city / topic names that need no grammar).
MULTILINGUAL_CHAT = {
    "de": ["Wie spät ist es?", "Kannst du mir bei meinen Hausaufgaben helfen?", "Wie wird das Wetter morgen in {city}?",
           "Was kann ich heute Abend kochen?", "Erklär mir bitte, wie ein Kühlschrank funktioniert.",
           "Schreib mir eine kurze Geburtstagskarte für meine Oma.", "Danke, das hat mir sehr geholfen!",
           "Welche Bücher empfiehlst du für den Urlaub?", "Fass diesen Artikel in drei Sätzen zusammen.",
           "Wie sage ich 'Guten Appetit' auf Englisch?", "Ich habe mein Passwort vergessen, was soll ich tun?",
           "Plane eine Wochenendreise nach {city}."],
    "fr": ["Quelle heure est-il ?", "Peux-tu m'aider à écrire une lettre de motivation ?", "Quel temps fera-t-il demain à {city} ?",
           "Donne-moi une recette facile pour ce soir.", "Explique-moi la photosynthèse simplement.",
           "Merci beaucoup, c'est parfait !", "Traduis cette phrase en anglais, s'il te plaît.",
           "Quels sont les meilleurs musées de {city} ?", "Résume ce texte en deux phrases.",
           "J'ai oublié mon mot de passe, comment le réinitialiser ?", "Salut, ça va ?", "Écris un petit poème sur l'automne."],
    "es": ["¿Qué hora es?", "¿Me ayudas con mis deberes de matemáticas?", "¿Qué tiempo hará mañana en {city}?",
           "Dame una receta rápida con arroz.", "Explícame cómo funciona un volcán.", "¡Muchas gracias por tu ayuda!",
           "Escribe un correo para pedir un día libre.", "¿Qué puedo visitar en {city} en dos días?",
           "Resume este artículo en pocas líneas.", "Hola, ¿cómo estás?", "Olvidé mi contraseña, ¿qué hago?",
           "Recomiéndame una película para ver en familia."],
    "it": ["Che ore sono?", "Mi aiuti a scrivere un'email al mio capo?", "Che tempo farà domani a {city}?",
           "Dammi una ricetta per la cena.", "Spiegami come funziona la fotosintesi.", "Grazie mille!",
           "Cosa vedere a {city} in un weekend?", "Riassumi questo testo in tre frasi.", "Ciao, come va?",
           "Traduci questa frase in inglese, per favore."],
    "pt": ["Que horas são?", "Você pode me ajudar com a lição de casa?", "Como vai estar o tempo amanhã em {city}?",
           "Me dá uma receita fácil para o jantar.", "Explique o ciclo da água de forma simples.", "Muito obrigado!",
           "O que visitar em {city}?", "Resuma este texto em poucas frases.", "Oi, tudo bem?",
           "Esqueci minha senha, o que eu faço?"],
    "nl": ["Hoe laat is het?", "Kun je me helpen met mijn huiswerk?", "Wat voor weer wordt het morgen in {city}?",
           "Geef me een makkelijk recept voor vanavond.", "Bedankt voor je hulp!", "Vat deze tekst samen in drie zinnen.",
           "Wat kan ik doen in {city} dit weekend?", "Hoi, hoe gaat het?"],
    "pl": ["Która jest godzina?", "Czy możesz mi pomóc w zadaniu domowym?", "Jaka będzie jutro pogoda w {city}?",
           "Podaj mi prosty przepis na obiad.", "Dziękuję bardzo!", "Streść ten tekst w trzech zdaniach.", "Cześć, co słychać?"],
    "ru": ["Который час?", "Помоги мне написать письмо начальнику.", "Какая завтра будет погода в {city}?",
           "Дай простой рецепт на ужин.", "Спасибо большое!", "Кратко перескажи этот текст.", "Привет, как дела?",
           "Объясни, как работает фотосинтез."],
    "ja": ["今何時ですか？", "宿題を手伝ってくれますか？", "明日の{city}の天気はどうですか？", "簡単な夕食のレシピを教えて。",
           "ありがとうございます！", "この文章を三行で要約してください。", "こんにちは、元気ですか？", "おすすめの本を教えてください。"],
    "zh": ["现在几点了？", "你能帮我写一封邮件吗？", "明天{city}的天气怎么样？", "给我一个简单的晚餐食谱。", "非常感谢！",
           "请用三句话总结这篇文章。", "你好，最近怎么样？", "推荐几本适合假期读的书。"],
    "tr": ["Saat kaç?", "Ödevime yardım eder misin?", "Yarın {city} için hava nasıl olacak?", "Akşam yemeği için kolay bir tarif ver.",
           "Çok teşekkürler!", "Merhaba, nasılsın?"],
    "sv": ["Vad är klockan?", "Kan du hjälpa mig med läxan?", "Hur blir vädret i {city} i morgon?", "Tack så mycket!", "Hej, hur mår du?"],
}
CITIES = ["Berlin", "Paris", "Madrid", "Roma", "Lisboa", "Amsterdam", "Kraków", "Tokyo", "Shanghai", "Istanbul",
          "Stockholm", "Wien", "Zürich", "Sevilla", "Napoli", "Porto", "Lyon", "Hamburg"]


def multilingual_chat(rng: random.Random) -> list[tuple[str, str]]:
    """(language, text) for every phrase of ``MULTILINGUAL_CHAT``; city slots filled 3 ways."""
    out = []
    for lang, phrases in sorted(MULTILINGUAL_CHAT.items()):
        for phrase in phrases:
            fills = rng.sample(CITIES, 3) if "{city}" in phrase else [""]
            for c in fills:
                text = phrase.format(city=c)
                if rng.random() < 0.3:  # typed casually: lowercase start, no final punctuation
                    text = text[0].lower() + text[1:].rstrip("?？!！.。 ")
                out.append((lang, text))
    return out
