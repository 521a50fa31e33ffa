"""The support-chat recipe's data, written for jaxaccel: the FAQ of Kestrel Mobile (an invented
mobile network that also sells phones online), example dialogues to tune the answerer on, and
held-out questions to score it. `python -m recipes.data.make_support` writes recipes/data/support/.

Every FAQ entry below is (question, answer, paraphrases). A paraphrase is a customer asking the
same thing in other words. The last paraphrase of each entry is held out (heldout.jsonl, with the
entry's id and its answer as the reference); the ones before it become training dialogues
(train.jsonl: the customer's question and the entry's answer as the assistant's reply). Entries
with a single paraphrase have no training dialogue at all, so the held-out questions about them
test answering from retrieved text the tune never saw. Deterministic: no randomness.
"""

from __future__ import annotations

import json
from pathlib import Path

COMPANY = "Kestrel Mobile"
HERE = Path(__file__).resolve().parent

# category: [(question, answer, [paraphrase, ..., held-out paraphrase])]
FAQ = {
    "billing": [
        ("When is my monthly bill issued?",
         "Bills are issued on the 1st of each month and collected by direct debit on the 10th. Every bill is in the "
         "app under Account > Bills.",
         ["what day does my bill come out", "When do you send the monthly invoice?",
          "On which date is my bill produced each month?"]),
        ("Why is my first bill higher than usual?",
         "Your first bill covers the part of the month since you joined plus the next full month in advance, so it "
         "is usually larger. From the second bill on you pay one month at a time.",
         ["my first invoice is way bigger than my plan price, why?", "Why did I pay almost double on my first bill?",
          "How come the opening bill costs more than the monthly price?"]),
        ("How do I change the bank account I pay from?",
         "Open Account > Payment method in the app, choose Replace direct debit and enter the new account details. "
         "The change applies from the next bill.",
         ["I switched banks, how do I update my direct debit?", "where can I change the account my bill is taken from",
          "Can I move my payments to a different bank account?"]),
        ("Can I pay my bill by card instead of direct debit?",
         "Yes. Choose Account > Payment method > Card in the app; the card is charged on the 10th of each month. A "
         "one-off payment by card is also possible under Bills > Pay now.",
         ["is direct debit the only way to pay or can I use my credit card",
          "Could I settle the monthly bill with a debit card?"]),
        ("What happens if I miss a payment?",
         "We retry the payment after five days and send you a reminder. If it is still unpaid after 14 days, "
         "outgoing calls and data are paused until the bill is paid, and a late fee of 5 euros is added.",
         ["my direct debit bounced, what now?", "What if my payment fails this month?",
          "What are the consequences of not paying a bill on time?"]),
        ("How do I get a copy of an old bill?",
         "All bills from the last 24 months can be downloaded as PDF under Account > Bills in the app or on the "
         "website. For older bills, contact us and we email them within two working days.",
         ["where can I download last year's invoices", "I need a PDF of my March bill for my accountant",
          "How can I find a bill from several months ago?"]),
        ("Why was I charged for premium numbers?",
         "Calls and texts to premium-rate numbers (starting with 0900 or short codes for paid services) are not "
         "part of any plan. You can block them for free under Settings > Spend controls.",
         ["there's a charge for a short code on my bill that I don't recognise",
          "What is this premium service charge on my invoice?"]),
        ("Can I set a spending limit?",
         "Yes. Under Settings > Spend controls you can set a monthly limit between 5 and 200 euros for anything "
         "outside your plan; once it is reached, extra charges are blocked until the next month.",
         ["How do I make sure my kid's bill never goes over budget?"]),
    ],
    "plans": [
        ("How do I change my plan?",
         "Go to Plan > Change plan in the app and pick a new one. An upgrade starts immediately; a downgrade starts "
         "on your next billing date.",
         ["i want a bigger plan, how do I switch", "Where can I move to a different tariff?",
          "What's the way to switch to another plan?"]),
        ("What happens to unused data at the end of the month?",
         "Up to 10 GB of unused data rolls over into the next month and is used first. Rolled-over data expires "
         "after that month.",
         ["do I lose leftover gigabytes?", "Does my unused data carry over?",
          "Is remaining data kept when the month ends?"]),
        ("What happens when I run out of data?",
         "When your allowance is used up, browsing slows to 1 Mbps until the next month. You can buy a 5 GB add-on "
         "for 4 euros under Plan > Add-ons to get full speed back.",
         ["my internet got really slow, have I used all my data?", "what if I go over my data allowance",
          "What do you do when my monthly data is finished?"]),
        ("Is there a contract or minimum term?",
         "SIM-only plans run month to month and can be cancelled with 30 days' notice. Plans that include a phone "
         "have a 24-month term.",
         ["am I locked in for a year?", "How long is the commitment on a SIM-only plan?",
          "Do I have to sign up for a fixed period?"]),
        ("Do you offer family plans?",
         "Yes. Up to five lines can share one bill, and every line after the first gets 20 percent off its monthly "
         "price. Add a line under Plan > Family.",
         ["can my whole household be on one account", "Is there a discount for adding my partner's phone?",
          "Can several family members share one bill with a discount?"]),
        ("Can I use my phone as a hotspot?",
         "Yes, tethering is included in every plan at no extra cost and uses your normal data allowance.",
         ["is tethering allowed on my plan?", "Can I share my mobile data with my laptop?",
          "Am I allowed to use my phone's data for other devices?"]),
        ("Do you have a plan for students?",
         "Students under 26 get 50 percent more data on any SIM-only plan. Upload proof of enrolment under "
         "Plan > Discounts and the extra data is added within a day.",
         ["Is there any discount for young people at university?"]),
        ("Is 5G included in my plan?",
         "5G is included in every plan at no extra cost. You need a 5G phone and to be in a 5G area; otherwise "
         "your phone uses 4G.",
         ["Do I have to pay more to get 5G speeds?"]),
    ],
    "roaming": [
        ("Can I use my phone in other EU countries?",
         "Yes. In every EU and EEA country you use your minutes, texts and data as at home, at no extra cost, up to "
         "a fair-use limit of 25 GB of data a month.",
         ["i'm going to Spain next week, will my plan work there?", "Does roaming in Europe cost extra?",
          "Can I use my allowance when I travel within the EU?"]),
        ("How much does roaming cost outside the EU?",
         "Outside the EU you can buy a World Pass for 6 euros a day, which gives you your normal allowance in 80 "
         "countries. Without it, data costs 10 euros per 100 MB.",
         ["what are the prices for using my phone in the US", "how expensive is data in Thailand on your network",
          "What do I pay for mobile data when I'm outside Europe?"]),
        ("How do I turn on roaming?",
         "Roaming is on by default for all plans. If you turned it off, switch it back on under Settings > Roaming "
         "in the app; it takes effect within five minutes.",
         ["my phone has no service abroad, do I need to activate something?", "Where is the roaming setting?",
          "How can I enable roaming before my trip?"]),
        ("How do I avoid a big bill when travelling?",
         "Turn on the travel cap under Settings > Roaming: it stops data outside the EU once you have spent 50 "
         "euros in a month, and we text you at 80 percent of that.",
         ["I'm scared of roaming charges on holiday, what can I do?", "Is there a way to limit roaming costs?",
          "How can I make sure roaming charges don't surprise me?"]),
        ("How much do international calls from home cost?",
         "Calls from home to EU numbers are included in every plan. Calls to the rest of the world cost 20 cents "
         "a minute, or buy the International add-on for 5 euros a month with 100 minutes.",
         ["what's the price of ringing my mum in Canada?", "Are calls to other countries included?",
          "How much will I pay to call abroad from here?"]),
        ("Why does my phone not connect to a network abroad?",
         "Restart the phone, then choose a partner network manually under your phone's mobile network settings. "
         "If that fails, check that roaming is on under Settings > Roaming.",
         ["landed in Greece and I have no signal at all", "My phone says no service since I arrived abroad",
          "Why can't my phone find any network in another country?"]),
        ("Does a World Pass renew automatically?",
         "A World Pass is charged only on days you use your phone outside the EU, and it is active for 24 hours "
         "from your first call, text or data use that day.",
         ["Will I keep paying for the World Pass after I get home?"]),
        ("Can I receive calls abroad for free?",
         "Receiving calls is free in the EU. Outside the EU, receiving calls costs 15 cents a minute unless you "
         "have a World Pass for that day.",
         ["Does answering the phone abroad cost anything?"]),
    ],
    "sim": [
        ("How do I activate my new SIM?",
         "Insert the SIM, then open the activation link in your welcome email or scan the QR code on the SIM card "
         "holder. The SIM works within 30 minutes of activation.",
         ["just got my sim in the post, what do I do now", "How do I get my new SIM card working?",
          "What are the steps to start using the SIM you sent me?"]),
        ("Can I get an eSIM?",
         "Yes, every plan can use an eSIM. Choose SIM > Switch to eSIM in the app; we email a QR code that you scan "
         "in your phone's settings, and your old SIM stops working once it is installed.",
         ["do you support esim", "Can I use a digital SIM instead of a plastic one?",
          "Is it possible to move my number to an eSIM?"]),
        ("How do I keep my number when I join you?",
         "Ask your current provider for your porting code, then enter it when you order your SIM or under "
         "SIM > Bring my number. The number moves on the working day you choose.",
         ["I want to switch to you but keep my old number", "how does number porting work",
          "Can I bring my existing phone number over to your network?"]),
        ("My SIM is lost or stolen. What should I do?",
         "Block the SIM right away under SIM > Block SIM in the app or by calling 0800 123 456. Then order a "
         "replacement, which is free and arrives in one to two working days with the same number.",
         ["someone stole my phone, how do I stop them using my sim", "I lost my SIM card",
          "What do I do if my SIM card goes missing?"]),
        ("What is my PUK code?",
         "The PUK unlocks your SIM after three wrong PIN entries. Find it in the app under SIM > PIN and PUK, or on "
         "the card holder your SIM came in.",
         ["my phone says SIM locked, enter PUK", "Where can I look up the PUK for my SIM?",
          "My SIM is blocked after wrong PIN attempts, how do I unlock it?"]),
        ("How do I leave and take my number to another provider?",
         "Request your porting code under Account > Leave Kestrel or by texting PORT to 65075. The code is valid for "
         "30 days; give it to your new provider and your plan ends when the number moves.",
         ["I want to cancel and move my number elsewhere", "How do I get the code to switch my number away?",
          "How can I transfer my number out to another network?"]),
        ("Can I have two numbers on one phone?",
         "Yes, if your phone supports dual SIM. Add a second line under Plan > Add line and choose eSIM; both "
         "numbers can be used on the same phone.",
         ["Is it possible to run a work and a personal number on one handset?"]),
        ("Why does my phone say No SIM?",
         "Restart the phone and check that the SIM sits flat in its tray. If the message stays, try the SIM in "
         "another phone; a faulty SIM is replaced for free under SIM > Replace SIM.",
         ["My phone suddenly can't detect the SIM card, what can I try?"]),
    ],
    "orders": [
        ("How long does delivery take?",
         "Orders placed before 6 pm on a working day ship the same day and arrive the next working day. Delivery "
         "is free.",
         ["when will my new phone arrive", "how fast do you deliver?",
          "How many days until my order gets to me?"]),
        ("How do I track my order?",
         "Open the tracking link in your shipping email, or see Orders in the app. Tracking starts a few hours "
         "after the order leaves our warehouse.",
         ["where is my parcel right now?", "Can I follow my delivery?",
          "Where do I check the delivery status of my phone?"]),
        ("Can I change the delivery address after ordering?",
         "You can change the address under Orders in the app until the order ships. After that, use the courier's "
         "tracking page to redirect it to a pickup point.",
         ["I put in the wrong address, can I fix it?", "how do I send my order somewhere else",
          "Is it possible to update where my order is delivered?"]),
        ("Can I pay for a phone in instalments?",
         "Yes. Any phone can be paid over 12, 24 or 36 months with no interest, added to your monthly bill. A "
         "credit check is done when you order.",
         ["can I spread the cost of a new phone", "Do you do monthly payments on handsets?",
          "Is there an option to pay off a phone month by month?"]),
        ("Can I trade in my old phone?",
         "Yes. Get a quote under Shop > Trade in, send the old phone in the free prepaid bag, and the value is paid "
         "to your bank account within five working days of it arriving.",
         ["will you take my old phone off me", "How much can I get for my used handset?",
          "Do you buy back old phones when I get a new one?"]),
        ("My order arrived damaged. What now?",
         "Report it within 14 days under Orders > Report a problem with a photo of the damage. We send a "
         "replacement and a courier collects the damaged item for free.",
         ["the screen was cracked when I unboxed it", "My parcel came broken",
          "What should I do if my delivery is damaged?"]),
        ("Can I pick up my order in a shop?",
         "Yes. Choose Click and collect at checkout and pick any Kestrel shop. The order is ready within two hours "
         "and we keep it for seven days; bring photo ID.",
         ["Is it possible to collect my new phone from one of your stores?"]),
        ("Do you sell phones without a plan?",
         "Yes. Every phone in our shop can be bought outright without a plan, and phones we sell are never "
         "locked to our network.",
         ["Can I just buy a handset from you without signing up for a contract?"]),
    ],
    "returns": [
        ("Can I return a phone I don't want?",
         "Yes, within 30 days of delivery, in its original box and with no damage. Start the return under Orders "
         "> Return and print the free label; the refund follows within five working days.",
         ["I changed my mind about the phone, can I send it back", "What's your return policy?",
          "How do I return a phone I no longer want?"]),
        ("How long is the warranty on a phone?",
         "Every phone we sell has a two-year warranty covering faults, not accidental damage. Warranty repairs are "
         "free and include shipping.",
         ["what's covered by the guarantee", "How many years of warranty do I get?",
          "For how long is my phone covered against defects?"]),
        ("How do I get my phone repaired?",
         "Book a repair under Support > Repair in the app. We send a prepaid box; most repairs take five working "
         "days and you get a loan phone on request.",
         ["my phone stopped charging, how do I get it fixed", "Where do I send my phone for repair?",
          "How can I arrange a repair for my device?"]),
        ("Do you cover a cracked screen?",
         "Accidental damage is not covered by the warranty. With Phone Care, which costs 7 euros a month, a screen "
         "repair costs 29 euros; without it we give a quote before repairing.",
         ["I dropped my phone and the screen broke, will you pay", "Is a smashed display covered?",
          "What happens if I crack my phone screen?"]),
        ("When will I get my refund?",
         "Refunds go back to the payment method you used within five working days after we receive the return. "
         "We email you when it is sent.",
         ["I returned my phone last week, where is my money", "How long does a refund take?",
          "When is the money for my return paid back?"]),
        ("Can I cancel my order before it ships?",
         "Yes. Cancel it under Orders in the app while it shows as Processing; the full amount is refunded within "
         "three working days.",
         ["I ordered by mistake, can I stop it", "how do I cancel an order?",
          "Is it possible to call off my order before it is sent?"]),
        ("What is Phone Care?",
         "Phone Care is our insurance for 7 euros a month. It covers accidental damage, loss and theft, with a "
         "29 euro fee per claim, and can be cancelled any month.",
         ["What do I get if I pay for your phone insurance?"]),
        ("Do I need to wipe my phone before a repair or return?",
         "Yes. Back up your data, sign out of your accounts and reset the phone to factory settings before you "
         "send it, and remove the SIM and any memory card.",
         ["Should I erase my data before sending my phone to you?"]),
    ],
    "account": [
        ("How do I reset my password?",
         "Tap Forgot password on the login screen and enter your email address. We send a reset link that is "
         "valid for one hour.",
         ["i can't log in to the app", "I forgot my account password",
          "How can I get back into my account if I don't remember my password?"]),
        ("How do I turn on two-step verification?",
         "Go to Account > Security > Two-step verification in the app and choose text message or an authenticator "
         "app. You then need a code each time you sign in on a new device.",
         ["how can I make my account more secure", "can I add 2FA to my login?",
          "Where do I enable two-factor authentication?"]),
        ("How do I change my address or email?",
         "Update your details under Account > Personal details. A new email address must be confirmed through the "
         "link we send to it.",
         ["I moved house, where do I update my address", "how do I change the email on my account",
          "Where can I edit my contact details?"]),
        ("How do I cancel my plan?",
         "Cancel under Account > Leave Kestrel in the app or by calling 0800 123 456. SIM-only plans end after 30 "
         "days' notice; phone plans can end early by paying the remaining phone instalments.",
         ["I want to close my account", "How do I end my contract with you?",
          "What do I need to do to stop my subscription?"]),
        ("How do I contact customer service?",
         "Chat with us in the app any time, or call 0800 123 456 from 8 am to 10 pm every day. Calls to this number "
         "are free from any Kestrel phone.",
         ["what's your phone number", "Can I talk to a real person?",
          "How can I reach your support team?"]),
        ("I got a suspicious text claiming to be from you. What should I do?",
         "Do not click any link in it. We never ask for your password or card details by text; forward the "
         "message to 7726 and delete it.",
         ["got an sms asking me to confirm my bank details, is it real?", "Is this text about a refund from you a scam?",
          "How do I report a phishing message pretending to be Kestrel?"]),
        ("Can someone else manage my account?",
         "Yes. Add an authorised person under Account > Authorised users; they can call us and make changes for "
         "you, but cannot see your payment details.",
         ["Can I give my son permission to sort out my account for me?"]),
        ("How do I see my data usage?",
         "The app's home screen shows the data, minutes and texts used this month, updated every 15 minutes. You "
         "can also text USAGE to 65075 for a summary.",
         ["Where can I check how many gigabytes I have left?"]),
    ],
    "network": [
        ("How do I check coverage at my address?",
         "Enter your postcode on the coverage map at kestrelmobile.example/coverage or in the app under Network > "
         "Coverage. It shows 4G and 5G indoors and outdoors.",
         ["will I get signal at home", "is there 5G where I live?",
          "How can I see if your network works in my area?"]),
        ("Why is my mobile data slow?",
         "Check your remaining data first: speed drops to 1 Mbps once your allowance is used. Otherwise restart the "
         "phone and look for work in your area under Network > Status.",
         ["internet is super slow on my phone today", "why is my 4G so sluggish?",
          "What can cause my data connection to be slow?"]),
        ("Is there an outage in my area?",
         "See Network > Status in the app or kestrelmobile.example/status for planned work and faults near you, "
         "with the time we expect them to be fixed.",
         ["nobody on my street has signal, is the network down?", "is something wrong with your network right now",
          "How do I find out about a network problem near me?"]),
        ("Do you support Wi-Fi calling?",
         "Yes. Turn on Wi-Fi calling in your phone's settings; calls and texts then go over Wi-Fi where signal is "
         "weak, at no extra cost, and count as normal calls.",
         ["can I make calls over my home wifi", "my signal indoors is bad, can I call through the internet?",
          "Does your network allow calling over Wi-Fi?"]),
        ("Why can't I make calls but data works?",
         "Turn airplane mode on and off, then check that call forwarding and call barring are off under Settings > "
         "Calls. If it continues, run the check under Support > Fix my line.",
         ["my phone has internet but calls won't go through", "Calls fail even though mobile data is fine",
          "Why are my calls not connecting when the internet still works?"]),
        ("How do I set up voicemail?",
         "Call 5000 from your phone and follow the steps to record a greeting and set a PIN. Voicemail is free to "
         "call from home and in the EU.",
         ["how do I record my voicemail message", "Where do I set up my answering service?",
          "How can I get voicemail working on my line?"]),
        ("My phone is not getting texts. What can I do?",
         "Check that your phone's storage is not full and that the message centre number is +44 7700 900123 under "
         "your messaging settings. Restart the phone after changing it.",
         ["Why are SMS messages not arriving on my phone?"]),
        ("Can I get a signal booster?",
         "If the coverage map shows weak indoor signal at your address, we lend you a free signal booster that "
         "connects to your home broadband. Request it under Network > Booster.",
         ["Is there a device you offer to improve reception inside my house?"]),
    ],
}


def rows() -> dict[str, list[dict]]:
    """{"faq": entries, "train": dialogues, "heldout": questions} (see the module doc)."""
    faq, train, heldout = [], [], []
    for category, entries in FAQ.items():
        for n, (question, answer, paraphrases) in enumerate(entries, 1):
            fid = f"{category}-{n:02d}"
            faq.append({"id": fid, "category": category, "question": question, "answer": answer})
            for k, text in enumerate(paraphrases[:-1], 1):
                train.append({"id": f"dialogue-{fid}-{k}", "faq_id": fid,
                              "messages": [{"role": "user", "content": text},
                                           {"role": "assistant", "content": answer}]})
            heldout.append({"id": f"heldout-{fid}", "faq_id": fid, "question": paraphrases[-1],
                            "reference": answer, "entry_in_train": len(paraphrases) > 1})
    return {"faq": faq, "train": train, "heldout": heldout}


def main(out: Path = HERE) -> None:
    """Write support/{faq,train,heldout}.jsonl under `out` (default: where the committed copies live)."""
    folder = out / "support"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in rows().items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data),
                                              encoding="utf-8")


if __name__ == "__main__":
    main()
